"""Dispatch for the TurboQuant paged-cache ops: Triton kernels on CUDA, the torch reference elsewhere.

``VLLM_GDS_TQ_FORCE_TRITON=1`` runs the Triton kernels on CPU tensors too (with ``TRITON_INTERPRET=1``; tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from vllm_gds_plugin.kernels.turboquant import naive
from vllm_gds_plugin.kvcache.quantizer import TurboQuantState

FORCE_TRITON_ENV = "VLLM_GDS_TQ_FORCE_TRITON"
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    return _HAVE_TRITON and (t.is_cuda or os.environ.get(FORCE_TRITON_ENV) == "1")


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
