"""The vLLM attention-backend API our TurboQuant backend is written against, the same on vLLM 0.26 and 0.32.

Imported by ``vllm_gds_plugin.kvcache.backend`` only (in the engine's worker, when vLLM resolves the backend
class), never from ``register()``. Version differences handled here:

- KV cache spec for a packed slot: 0.32 has ``AttentionSpec.state_content_bytes`` (set from the backend's
  ``customize_spec`` hook); 0.26 has no hook but ships ``TQFullAttentionSpec`` (its native TurboQuant's spec,
  ``real_page_size_bytes = block_size * num_kv_heads * tq_slot_size``), which we reuse with our slot size.
- Per-layer cache tensor: 0.26 reshapes the raw buffer with the backend's ``get_kv_cache_shape`` (we return
  ``[blocks, block_size, kv_heads, slot]``); 0.32 hands every backend the logical ``[B, H, N, C]`` view of a
  layout the backend declares (``LBNHC``: physically ``[B, N, H, C]``), which we permute back to our order.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_gds_plugin.compat.version import check_supported_vllm

# 0.32 ("state_content_bytes" + layouts) vs 0.26 (TQFullAttentionSpec + get_kv_cache_shape).
HAS_SPEC_HOOK = "state_content_bytes" in {f.name for f in dataclasses.fields(AttentionSpec)}

__all__ = [
    "AttentionBackend", "AttentionCGSupport", "AttentionImpl", "AttentionMetadata", "AttentionMetadataBuilder",
    "AttentionType", "CommonAttentionMetadata", "MultipleOf", "AttentionSpec", "HAS_SPEC_HOOK",
    "extract_layer_index", "get_current_vllm_config", "packed_spec", "paged_cache_view", "preferred_layouts",
    "vllm_series",
]


def vllm_series() -> tuple[int, int]:
    return check_supported_vllm()


def packed_spec(spec: AttentionSpec, slot_bytes: int) -> AttentionSpec:
    """``spec`` with a page of ``block_size * num_kv_heads * slot_bytes`` bytes (K and V packed in one slot)."""
    if HAS_SPEC_HOOK:
        return dataclasses.replace(spec, state_content_bytes=slot_bytes)
    if type(spec) is not FullAttentionSpec:
        # Sliding-window/chunked specs are refused at backend selection; anything else is a new vLLM case.
        raise TypeError(f"TurboQuant KV cache cannot pack a {type(spec).__name__}")
    from vllm.v1.kv_cache_interface import TQFullAttentionSpec

    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
    return TQFullAttentionSpec(**fields, tq_slot_size=slot_bytes)


def paged_cache_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """The layer's cache as ``uint8 [blocks, block_size, kv_heads, slot]`` (a view, no copy)."""
    if HAS_SPEC_HOOK:
        # Logical [B, H, N, C] over an LBNHC (= physical [B, N, H, C]) allocation.
        return kv_cache.permute(0, 2, 1, 3)
    return kv_cache


def preferred_layouts() -> tuple | None:
    """Layouts our kernels consume, for 0.32's ``supported_kv_cache_layouts`` (0.26 has no such notion)."""
    if not HAS_SPEC_HOOK:
        return None
    from vllm.v1.kv_cache_interface import KVCacheLayout

    return (KVCacheLayout.LBNHC,)
