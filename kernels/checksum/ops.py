"""Checksums of tensors: one Triton launch for CUDA tensors, the plain-torch reference elsewhere.

``VLLM_GDS_CHECKSUM_FORCE_TRITON=1`` runs the Triton kernel on CPU tensors too (with ``TRITON_INTERPRET=1``;
tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from vllm_gds_plugin.kernels import triton_runs
from vllm_gds_plugin.kernels.checksum import naive

FORCE_TRITON_ENV = "VLLM_GDS_CHECKSUM_FORCE_TRITON"


class Pending(Protocol):
    def result(self) -> list[str]:
        """The checksums, in the order the tensors were given (waits for the GPU)."""


class Planned(Pending, Protocol):
    def launch(self, lo: int, hi: int) -> None:
        """Tensors ``lo`` .. ``hi - 1`` are in place: start their checksums (on GPUs, on the current stream)."""


class _Deferred:
    """The reference path: computed when asked."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._tensors = list(tensors)

    def launch(self, lo: int, hi: int) -> None:
        pass

    def result(self) -> list[str]:
        return [naive.checksum(t) for t in self._tensors]


def plan_checksums(tensors: Sequence[torch.Tensor]) -> Planned:
    """Checksums of ``tensors`` (all on one device, their memory allocated, their bytes possibly still arriving),
    started range by range with ``.launch`` as the bytes land; ``.result()`` once every range was launched."""
    if tensors and triton_runs(tensors[0], FORCE_TRITON_ENV):
        from vllm_gds_plugin.kernels.checksum import triton_checksum

        return triton_checksum.ChecksumTable(tensors)
    return _Deferred(tensors)


def start_checksums(tensors: Sequence[torch.Tensor]) -> Pending:
    """Start the checksums of ``tensors`` (all on one device, every byte in place): on GPUs the kernel is
    launched on the current stream and this returns at once; ``.result()`` gives them."""
    planned = plan_checksums(tensors)
    planned.launch(0, len(tensors))
    return planned


def checksums(tensors: Sequence[torch.Tensor]) -> list[str]:
    return start_checksums(tensors).result()
