"""One vLLM engine per KV configuration: perplexity prompt (prompt_logprobs) and needle prompts in one batch.

Engines run one after another in this process (the reference first); each is deleted before the next starts.
On CPU the engine settings are the fast in-process ones the test suite uses; on CUDA vLLM's defaults, eager mode
(accuracy does not depend on CUDA graphs and eager starts faster) and a moderate memory share so that the next
engine starts cleanly after the previous one.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.accuracy.configs import KVConfig
from benchmarks.accuracy.metrics import TopK, topk_from_prompt_logprobs
from benchmarks.accuracy.needle import ANSWER_TOKENS, NeedleCase

CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
GPU_MEMORY_UTILIZATION = 0.5
ENGINE_NOTE = ("enforce_eager=True (no CUDA graphs, no torch.compile: the same attention math, faster engine start), "
               "seed=0, prefix caching off")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_env() -> None:
    """CPU engine settings (before vLLM is imported); the caller's environment wins."""
    if not cuda_available():
        for k, v in CPU_ENV.items():
            os.environ.setdefault(k, v)


@dataclass
class RunOutput:
    topk: TopK
    needle_outputs: list[str]
    engine_s: float
    run_s: float


def run_config(cfg: KVConfig, model: Path, ppl_ids: list[int], cases: list[NeedleCase], topk: int,
               max_model_len: int, prefill_chunk: int | None = None) -> RunOutput:
    """``prefill_chunk``: at most this many prompt tokens per engine step (chunked prefill); None: vLLM's default."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs: dict[str, Any] = dict(model=str(model), dtype="bfloat16", max_model_len=max_model_len, seed=0,
                                  enforce_eager=True, max_logprobs=topk, enable_prefix_caching=False,
                                  **cfg.engine_kwargs())
    if prefill_chunk is not None:
        kwargs.update(enable_chunked_prefill=True, max_num_batched_tokens=prefill_chunk)
    if cuda_available():
        kwargs["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    else:
        kwargs["distributed_executor_backend"] = "uni"
    t0 = time.time()
    llm = LLM(**kwargs)
    t1 = time.time()
    try:
        prompts = [TokensPrompt(prompt_token_ids=ppl_ids), *(TokensPrompt(prompt_token_ids=c.prompt_ids)
                                                              for c in cases)]
        params = [SamplingParams(max_tokens=1, prompt_logprobs=topk, temperature=0.0),
                  *(SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0) for _ in cases)]
        outs = llm.generate(prompts, params, use_tqdm=False)
        result = RunOutput(topk_from_prompt_logprobs(outs[0].prompt_logprobs, ppl_ids, topk),
                           [o.outputs[0].text for o in outs[1:]], t1 - t0, time.time() - t1)
    finally:
        del llm
        gc.collect()
        if cuda_available():
            import torch

            torch.cuda.empty_cache()
    return result
