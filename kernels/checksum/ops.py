"""Checksums of tensors: one Triton launch for CUDA tensors, the plain-torch reference elsewhere.

``VLLM_GDS_CHECKSUM_FORCE_TRITON=1`` runs the Triton kernel on CPU tensors too (with ``TRITON_INTERPRET=1``;
tests)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_gds_plugin.kernels import triton_runs
from vllm_gds_plugin.kernels.checksum import naive

FORCE_TRITON_ENV = "VLLM_GDS_CHECKSUM_FORCE_TRITON"


def checksums(tensors: Sequence[torch.Tensor]) -> list[str]:
    if tensors and triton_runs(tensors[0], FORCE_TRITON_ENV):
        from vllm_gds_plugin.kernels.checksum import triton_checksum

        return triton_checksum.checksums(tensors)
    return [naive.checksum(t) for t in tensors]
