"""The fast host path to GPUs: parallel reads into a bounded ring of pinned buffers, each chunk's pieces copied
asynchronously (several CUDA streams) straight into the parameters' storage. No GPU staging at all."""

from __future__ import annotations

import torch

from vllm_gds_plugin.loading.readers.base import ALIGN, FileJob, ReadResult
from vllm_gds_plugin.loading.readers.ring import RingOptions, aligned_slice, read_with_ring


class CudaStaging:
    """Pinned ring; slot ``i`` copies on stream ``i % streams`` and is reusable once its event completed."""

    def __init__(self, device: torch.device, streams: int) -> None:
        self.streams = [torch.cuda.Stream(device=device) for _ in range(max(1, streams))]
        self.events: dict[int, torch.cuda.Event] = {}

    def alloc(self, nbytes: int) -> torch.Tensor:
        return aligned_slice(torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True), nbytes)

    def _stream(self, slot: int) -> torch.cuda.Stream:
        return self.streams[slot % len(self.streams)]

    def copy(self, slot: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        # The current device is per thread and reader threads start on cuda:0; pin it to the destination's.
        with torch.cuda.device(dst.device), torch.cuda.stream(self._stream(slot)):
            dst.copy_(src, non_blocking=True)

    def mark(self, slot: int) -> None:
        ev = torch.cuda.Event()
        ev.record(self._stream(slot))
        self.events[slot] = ev

    def wait(self, slot: int) -> None:
        ev = self.events.pop(slot, None)
        if ev is not None:
            ev.synchronize()

    def finish(self) -> None:
        for s in self.streams:
            s.synchronize()
        self.events.clear()


class PinnedReader:
    def __init__(self, opts: RingOptions, device: torch.device, streams: int) -> None:
        self.opts = opts
        self.device = device
        self.streams = streams

    def read(self, jobs: list[FileJob], verify: bool) -> ReadResult:
        try:
            return read_with_ring(CudaStaging(self.device, self.streams), "pinned", self.opts, jobs, verify)
        finally:
            # The ring went back to torch's pinned-host cache; give it back to the OS (the load is one-off).
            empty = getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                empty()
