"""Tensor-parallel placement of KV heads, as vLLM partitions them (the same on vLLM 0.26 and 0.32).

Per-KV-head data the plugin keeps outside the weights (TurboQuant calibration) must follow vLLM's split of
``QKVParallelLinear``: with ``tp <= total_kv_heads`` rank ``r`` holds the contiguous heads
``[r * H/tp, (r + 1) * H/tp)``; with ``tp > total_kv_heads`` every head is replicated ``tp / H`` times and rank ``r``
holds head ``r // (tp / H)`` (``shard_rank = tp_rank // num_kv_head_replicas`` in vLLM's linear.py).
Called in the worker, after vLLM initialised its process groups (i.e. while the model is being built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def tp_rank_and_size() -> tuple[int, int]:
    """This worker's tensor-parallel (rank, world size)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def kv_head_slice(total_kv_heads: int, tp_rank: int, tp_size: int) -> slice:
    """The model-wide KV head indices rank ``tp_rank`` of ``tp_size`` holds (see the module docstring)."""
    if tp_size >= total_kv_heads:
        if tp_size % total_kv_heads:
            raise ValueError(f"tensor parallel size {tp_size} is not a multiple of {total_kv_heads} KV heads")
        head = tp_rank // (tp_size // total_kv_heads)
        return slice(head, head + 1)
    if total_kv_heads % tp_size:
        raise ValueError(f"{total_kv_heads} KV heads do not split over tensor parallel size {tp_size}")
    per_rank = total_kv_heads // tp_size
    return slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)


def rank_kv_heads(total_kv_heads: int) -> slice:
    """The KV heads of the calling worker."""
    return kv_head_slice(total_kv_heads, *tp_rank_and_size())


@dataclass(frozen=True)
class ServedModel:
    """What per-KV-head side data must match: the model vLLM serves and its model-wide attention geometry."""

    model: str  # model_config.model: a local folder (HF or a ``vllm-gds shard`` output) or a hub id
    num_layers: int  # all layers (pipeline stages together): layer indices are model-wide
    total_kv_heads: int  # before the tensor-parallel split
    head_dim: int


def served_model(vllm_config: Any) -> ServedModel:
    mc = vllm_config.model_config
    return ServedModel(str(mc.model), mc.get_total_num_hidden_layers(), mc.get_total_num_kv_heads(),
                       mc.get_head_size())
