"""vLLM's FlashAttention varlen call, for TurboQuant prefill (``kernels/turboquant/dense_prefill.py``).

``VLLM_GDS_TQ_PREFILL=flash`` (the default) runs prefill through FlashAttention over dequantized K/V where vLLM
ships it (CUDA builds; elsewhere, or for a head size it lacks, the Triton kernel takes prefill); ``triton`` keeps
prefill on the plugin's own Triton attention kernel. The CPU platform always runs the torch reference. Measured on
an H100 with vLLM 0.26 (docs/turboquant.md): 8 x 32K-token prefill 10.3 s with FlashAttention vs 18.4 s with the
Triton kernel (bf16 KV: 9.4 s).
"""

from __future__ import annotations

import functools
import os

import torch

from vllm_gds_plugin.kvcache.presets import TurboQuantConfigError

PREFILL_ENV = "VLLM_GDS_TQ_PREFILL"
_CHOICES = ("flash", "triton")
DEFAULT_PREFILL = "flash"


def prefill_kernel() -> str:
    choice = os.environ.get(PREFILL_ENV, DEFAULT_PREFILL)
    if choice not in _CHOICES:
        raise TurboQuantConfigError(f"{PREFILL_ENV}={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def prefill_attention(device_type: str, head_size: int):  # -> dense_prefill.VarlenAttention | None
    """What TurboQuant prefill attends with: FlashAttention (unless ``VLLM_GDS_TQ_PREFILL=triton``) where
    available, else None (the Triton attention kernel, or the torch reference on CPU). For tests on CPU: with
    ``VLLM_GDS_TQ_FORCE_TRITON=1`` (kernels/turboquant/ops.py) the whole path runs, the torch reference of the
    varlen call in FlashAttention's place."""
    if prefill_kernel() != "flash":
        return None
    from vllm_gds_plugin.kernels.turboquant import naive, ops

    if device_type == "cpu" and os.environ.get(ops.FORCE_TRITON_ENV) == "1":
        return naive.varlen_attention
    return varlen_flash_attention(device_type, head_size)


@functools.cache
def varlen_flash_attention(device_type: str, head_size: int):  # -> dense_prefill.VarlenAttention | None
    """vLLM's ``flash_attn_varlen_func`` wrapped to ``dense_prefill.VarlenAttention``; None where vLLM has none
    for this device and head size."""
    if device_type != "cuda":
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import (
            flash_attn_varlen_func,
            get_flash_attn_version,
            is_flash_attn_varlen_func_available,
        )
    except ImportError:
        return None
    if not is_flash_attn_varlen_func_available():
        return None
    version = get_flash_attn_version(head_size=head_size)
    if version is None:
        return None

    def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
               max_q: int, max_k: int, scale: float, causal: bool, out: torch.Tensor,
               want_lse: bool) -> torch.Tensor | None:
        result = flash_attn_varlen_func(q, k, v, max_seqlen_q=max_q, cu_seqlens_q=cu_q, max_seqlen_k=max_k,
                                        cu_seqlens_k=cu_k, softmax_scale=scale, causal=causal, out=out,
                                        return_softmax_lse=want_lse, fa_version=version)
        return result[1] if want_lse else None

    return varlen
