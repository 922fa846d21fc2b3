"""Triton kernels with their plain-torch references: ``turboquant/`` (the paged KV cache), ``checksum/`` (the
shard tensor checksum the loader verifies on the GPU)."""

from __future__ import annotations

import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def triton_runs(t: torch.Tensor, force_env: str) -> bool:
    """Whether ``t`` goes to a Triton kernel: CUDA tensors, and CPU tensors when ``force_env`` is "1" (tests, with
    ``TRITON_INTERPRET=1``)."""
    return HAVE_TRITON and (t.is_cuda or os.environ.get(force_env) == "1")
