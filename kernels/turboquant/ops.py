"""Dispatch for the TurboQuant paged-cache ops: Triton kernels on CUDA, the torch reference elsewhere.

``VLLM_GDS_TQ_FORCE_TRITON=1`` runs the Triton kernels on CPU tensors too (with ``TRITON_INTERPRET=1``; tests).
"""

from __future__ import annotations

import torch

from vllm_gds_plugin.kernels import triton_runs
from vllm_gds_plugin.kernels.turboquant import naive
from vllm_gds_plugin.kvcache.quantizer import TurboQuantState

FORCE_TRITON_ENV = "VLLM_GDS_TQ_FORCE_TRITON"


def use_triton(t: torch.Tensor) -> bool:
    return triton_runs(t, FORCE_TRITON_ENV)


def store(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
          state: TurboQuantState) -> None:
    if use_triton(key):
        from vllm_gds_plugin.kernels.turboquant import triton_store

        triton_store.store(key, value, cache, slot_mapping, state)
    else:
        naive.store(key, value, cache, slot_mapping, state)


def attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
              query_start_loc: torch.Tensor, scale: float, state: TurboQuantState,
              out: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(query):
        from vllm_gds_plugin.kernels.turboquant import triton_attention

        return triton_attention.attention(query, cache, block_table, seq_lens, query_start_loc, scale, state, out)
    return naive.attention(query, cache, block_table, seq_lens, query_start_loc, scale, state, out)
