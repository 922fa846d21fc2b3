"""The fast host path to GPUs: parallel reads into a bounded ring of pinned buffers (or page-locked windows of
the page cache itself, ``io="mapped"``), each chunk's pieces copied asynchronously (several CUDA streams)
straight into the parameters' storage. No GPU staging at all."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import torch

from vllm_gds_plugin.loading.readers.base import ALIGN, FileJob, ReadResult, ShardLoadError
from vllm_gds_plugin.loading.readers.cuda_driver import DriverCopies
from vllm_gds_plugin.loading.readers.ring import Pieces, RingOptions, aligned_slice, read_with_ring

# cudaHostRegister flags: usable from any context; read-only, which is what lets the driver page-lock a
# read-only shared file mapping (a writable lock would need write access to the page cache's pages).
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_READ_ONLY = 0x08


class CudaStaging:
    """Pinned slots; slot ``i`` copies on stream ``i % streams`` and is reusable once its event completed.

    Copies and events go through the driver API (:mod:`~vllm_gds_plugin.loading.readers.cuda_driver`: no
    torch dispatch under the GIL per copy). The only host synchronization is :meth:`wait` on a slot's own event
    (slot reuse) and :meth:`finish`."""

    def __init__(self, device: torch.device, streams: int) -> None:
        self.device = device
        self.streams = [torch.cuda.Stream(device=device) for _ in range(max(1, streams))]
        self.handles = [s.cuda_stream for s in self.streams]
        self.driver = DriverCopies(device)
        self.cudart: Any = torch.cuda.cudart()
        self._lock = threading.Lock()
        self.seconds = {"alloc_s": 0.0, "pin_s": 0.0, "unpin_s": 0.0}  # summed over reader threads

    def _add(self, key: str, start: float) -> None:
        with self._lock:
            self.seconds[key] += time.perf_counter() - start

    def alloc(self, nbytes: int) -> torch.Tensor:
        t0 = time.perf_counter()
        # Exactly nbytes: torch's pinned allocator rounds requests up to a power of two (a chunk is one), and
        # its blocks are page aligned, so no alignment slack is needed (which would double the pinned size).
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if buf.data_ptr() % ALIGN:
            buf = aligned_slice(torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True), nbytes)
        self._add("alloc_s", t0)
        return buf

    def issue(self, slot: int, src: torch.Tensor, pieces: Pieces) -> None:
        self.driver.issue(slot, src.data_ptr(), pieces, self.handles[slot % len(self.handles)])

    def wait(self, slot: int) -> None:
        self.driver.wait(slot)

    def finish(self) -> None:
        for s in self.streams:
            s.synchronize()

    def close(self) -> None:
        self.driver.close()

    def pin(self, addr: int, nbytes: int) -> None:
        t0 = time.perf_counter()
        with torch.cuda.device(self.device):
            err = self.cudart.cudaHostRegister(addr, nbytes, HOST_REGISTER_PORTABLE | HOST_REGISTER_READ_ONLY)
        if err != self.cudart.cudaError.success:
            raise ShardLoadError(f"cudaHostRegister(read-only) of {nbytes} bytes of a mapped shard failed: "
                                 f"{self.cudart.cudaGetErrorString(err)}")
        self._add("pin_s", t0)

    def unpin(self, addr: int) -> None:
        t0 = time.perf_counter()
        with torch.cuda.device(self.device):
            err = self.cudart.cudaHostUnregister(addr)
        if err != self.cudart.cudaError.success:
            raise ShardLoadError(f"cudaHostUnregister failed: {self.cudart.cudaGetErrorString(err)}")
        self._add("unpin_s", t0)

    def pin_unavailable_reason(self, addr: int, nbytes: int) -> str | None:
        # In a thread of its own: a failed CUDA runtime call leaves its error as that thread's "last error",
        # which torch would later report from an unrelated kernel launch on the calling thread.
        reasons: list[str] = []

        def probe() -> None:
            try:
                self.pin(addr, nbytes)
                self.unpin(addr)
            except ShardLoadError as e:
                reasons.append(str(e))

        t = threading.Thread(target=probe, name="gds-sharded-pin-probe")
        t.start()
        t.join()
        return reasons[0] if reasons else None


class PinnedReader:
    def __init__(self, opts: RingOptions, device: torch.device, streams: int) -> None:
        self.opts = opts
        self.device = device
        self.streams = streams

    def read(self, jobs: list[FileJob], verify: bool) -> ReadResult:
        t0 = time.perf_counter()
        staging = CudaStaging(self.device, self.streams)
        setup_s = time.perf_counter() - t0
        try:
            result = read_with_ring(staging, "pinned", self.opts, jobs, verify)
        finally:
            t0 = time.perf_counter()
            staging.close()
            release_s = time.perf_counter() - t0
            # The slots went back to torch's pinned-host cache; give them back to the OS (the load is one-off),
            # in the background: unpinning takes ~20 ms that the caller (vLLM's post-processing) need not wait.
            empty = getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                threading.Thread(target=empty, name="gds-sharded-unpin", daemon=True).start()
        times = {**staging.seconds, "setup_s": setup_s, "release_s": release_s}
        return dataclasses.replace(result, detail={**result.detail, **{k: round(v, 4) for k, v in times.items()}})
