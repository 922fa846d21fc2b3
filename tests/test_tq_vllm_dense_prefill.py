"""The FlashAttention prefill path's vLLM side, inside a real vLLM engine on the CPU build.

On CUDA, prefill dequantizes each multi-token query's cache range and calls vLLM's FlashAttention
(kernels/turboquant/dense_prefill.py). With ``VLLM_GDS_TQ_FORCE_TRITON=1`` on CPU the same path runs: its Triton
kernels in the interpreter, the torch reference of the varlen call in FlashAttention's place (and of the store,
below). The kernel tests check that path against ``naive.attention`` on hand-made batches; this checks what they
cannot: the metadata builder's decodes-first batches and per-batch plan made from vLLM's CPU-side lengths, and the
forward's decode/prefill split, on chunked prefills mixed with decodes. Every forward of the engine is shadowed: the
reference attention over the same cache, query and metadata, compared per call. (Comparing the engine's log-probs
instead would be bounded by rounding amplified through 30 layers and the quantizer, up to ~1 nat here:
benchmarks/engine_sensitivity.py.)
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch

if not torch.cuda.is_available():  # before the first import of the kernel modules (triton.jit reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from conftest import FAST_ENGINE_KWARGS  # noqa: E402

from vllm_gds_plugin.compat.attention import install  # noqa: E402
from vllm_gds_plugin.compat.flash_attention import PREFILL_ENV  # noqa: E402
from vllm_gds_plugin.kernels.turboquant import naive, ops  # noqa: E402
from vllm_gds_plugin.kernels.turboquant.ops import FORCE_TRITON_ENV  # noqa: E402
from vllm_gds_plugin.kvcache.backend import TurboQuantImpl, paged_cache_view  # noqa: E402

pytestmark = pytest.mark.slow

# A 16-token budget: after the first step the short prompt decodes in the same steps as the long prompt's chunks.
CHUNK_BUDGET = 16


def test_dense_prefill_path_matches_the_reference_per_call(model_path: Any, lee_text: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFILL_ENV, "flash")
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    calls: list[tuple[int, int, float]] = []  # (decodes, prefill tokens, relative difference) per dense forward
    forward = TurboQuantImpl.forward

    def shadowed(self: TurboQuantImpl, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        out = forward(self, layer, query, key, value, kv_cache, attn_metadata, output, **kwargs)
        md = attn_metadata
        if md is not None and md.prefill is not None:
            n = md.num_actual_tokens
            ref = naive.attention(query[:n], paged_cache_view(kv_cache), md.block_table, md.seq_lens,
                                  md.query_start_loc, self.scale, self.state).float()
            rel = ((out[:n].float() - ref).norm() / ref.norm()).item()
            calls.append((md.num_decodes, n - md.num_decodes, rel))
        return out

    monkeypatch.setattr(TurboQuantImpl, "forward", shadowed)
    # The torch reference stores (the Triton store kernel writes its bytes exactly: test_tq_kernels): in the
    # interpreter it took half of this test's time and is not what this test checks.
    monkeypatch.setattr(ops, "store", naive.store)
    install()
    from vllm import LLM, SamplingParams

    # A small cache: the interpreter copies every tensor argument of a launch, the whole layer cache included.
    llm = LLM(model=str(model_path), kv_cache_dtype="turboquant", enable_chunked_prefill=True,
              enable_prefix_caching=False, max_num_batched_tokens=CHUNK_BUDGET, num_gpu_blocks_override=20,
              **FAST_ENGINE_KWARGS)
    # The long prompt stops at its first token: steps of decodes alone would cost the interpreter as much as a chunk
    # (a store program takes 16 tokens on CPU) and add nothing the per-call check needs.
    prompts = ["The capital of France is", lee_text[:160]]
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (3, 1)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    del llm
    gc.collect()
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 1]
    print(f"{len(calls)} dense-path forwards, (decodes, prefill tokens): {sorted({c[:2] for c in calls})}, "
          f"worst relative difference {max(c[2] for c in calls):.2e}")
    layers = 30  # SmolLM2-135M
    assert len(calls) >= 3 * layers  # several prefill chunks went through the dense path
    assert any(decodes > 0 for decodes, _, _ in calls)  # decodes first, then a chunk, in one batch
    worst = max(rel for _, _, rel in calls)
    # float32 in another order, rounded to the model's bf16: a last-bit difference in a small fraction of outputs
    assert worst < 2e-3, worst
