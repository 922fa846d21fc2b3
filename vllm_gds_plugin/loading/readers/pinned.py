"""The fast host path to GPUs: parallel reads into a bounded ring of pinned buffers (or page-locked windows of
the page cache itself, ``io="mapped"``), each chunk's pieces copied asynchronously (several CUDA streams)
straight into the parameters' storage. No GPU staging at all."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vllm_gds_plugin.loading.memory import huge_page_block
from vllm_gds_plugin.loading.readers.base import ALIGN, FileJob, Landed, ReadResult, ShardLoadError
from vllm_gds_plugin.loading.readers.cuda_driver import DriverCopies
from vllm_gds_plugin.loading.readers.ring import Pieces, RingOptions, aligned_slice, read_with_ring, ring_slots

# cudaHostRegister flags: usable from any context; read-only, which is what lets the driver page-lock a
# read-only shared file mapping (a writable lock would need write access to the page cache's pages).
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_READ_ONLY = 0x08


@dataclass
class _Ring:
    arena: torch.Tensor | None  # the page-locked huge-page region the slots are cut from; None: torch's pinned
    slots: list[torch.Tensor]
    note: str  # why the ring is not what it should be ("" when it is)


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
        self.ring: _Ring | None = None  # the staging ring in use
        self.note = ""  # the ring's note, kept after close() for the read's result
        self._early: tuple[int, int, threading.Thread, list[_Ring]] | None = None  # a ring being prefetched
        self._closed = False

    def _add(self, key: str, start: float) -> None:
        with self._lock:
            self.seconds[key] += time.perf_counter() - start

    def prefetch_ring(self, count: int, nbytes: int) -> None:
        """Start allocating the ring :meth:`alloc_ring` will most likely be asked for, on a thread of its own, so
        that the allocation overlaps the caller's checks and planning."""
        box: list[_Ring] = []

        def allocate() -> None:
            try:
                box.append(self._new_ring(count, nbytes))
            except Exception:  # noqa: BLE001 - alloc_ring allocates again and raises where it is called
                pass
        thread = threading.Thread(target=allocate, name="gds-sharded-ring-alloc")
        thread.start()
        self._early = (count, nbytes, thread, box)

    def _take_early(self) -> tuple[tuple[int, int], _Ring] | None:
        """The prefetched ring and its (count, nbytes) once its thread is done; None when none was prefetched or
        its allocation failed."""
        if self._early is None:
            return None
        count, nbytes, thread, box = self._early
        self._early = None
        thread.join()
        return ((count, nbytes), box[0]) if box else None

    def alloc_ring(self, count: int, nbytes: int) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        early = self._take_early()
        if early is not None and early[0] == (count, nbytes):
            self.ring = early[1]
        else:
            if early is not None:  # another layout (a cold read's larger chunks)
                self._release(early[1])
            self.ring = self._new_ring(count, nbytes)
        self.note = self.ring.note
        self._add("alloc_s", t0)  # what the reader waited for: ~0 when the prefetch was done in time
        return self.ring.slots

    def _new_ring(self, count: int, nbytes: int) -> _Ring:
        """One huge-page region, faulted in and page-locked in one call (7 ms for 96 MiB on the H100 machine,
        where torch's pinned allocator took 67-93 ms for the same slots); torch's pinned allocator only where the
        driver refuses to lock it."""
        arena = huge_page_block(count * nbytes)
        arena.fill_(0)  # fault it in as huge pages here, not page by page inside the registration

        def lock() -> None:
            with torch.cuda.device(self.device):
                err = self.cudart.cudaHostRegister(arena.data_ptr(), arena.numel(), HOST_REGISTER_PORTABLE)
            if err != self.cudart.cudaError.success:
                raise ShardLoadError(f"cudaHostRegister of the {arena.numel()}-byte staging ring failed: "
                                     f"{self.cudart.cudaGetErrorString(err)}")
        failure = _failure_in_own_thread(lock)
        if failure is None:
            return _Ring(arena, [arena[i * nbytes:(i + 1) * nbytes] for i in range(count)], "")
        return _Ring(None, [_torch_pinned(nbytes) for _ in range(count)],
                     f"staging ring in torch's pinned memory (cudaHostRegister: {failure})")

    def _release(self, ring: _Ring) -> None:
        """Unlock and free a ring on a thread of its own (2.5 ms for 96 MiB on the H100 machine: the load need
        not wait for it); slots from torch's pinned allocator go back to the OS from its cache at once."""
        if ring.arena is None:
            empty = getattr(torch._C, "_host_emptyCache", None)
            ring.slots.clear()
            if empty is not None:
                empty()
            return
        arena, device, cudart = ring.arena, self.device, self.cudart

        def unlock() -> None:
            with torch.cuda.device(device):
                cudart.cudaHostUnregister(arena.data_ptr())
        threading.Thread(target=unlock, name="gds-sharded-ring-free").start()  # not a daemon: exit waits for it

    def issue(self, slot: int, src: torch.Tensor, pieces: Pieces) -> None:
        self.driver.issue(slot, src.data_ptr(), pieces, self.handles[slot % len(self.handles)])

    def wait(self, slot: int) -> None:
        self.driver.wait(slot)

    def finish(self) -> None:
        for s in self.streams:
            s.synchronize()

    def close(self) -> None:
        """Everything issued is done: free the ring (and a prefetched one nobody adopted). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.driver.close()
        if (early := self._take_early()) is not None:  # prefetched, never adopted
            self._release(early[1])
        if self.ring is not None:
            self._release(self.ring)
            self.ring = None

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
        def probe() -> None:
            self.pin(addr, nbytes)
            self.unpin(addr)
        return _failure_in_own_thread(probe)


def _torch_pinned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of torch's pinned memory, 4 KiB aligned (O_DIRECT reads land in it). Exactly nbytes where it
    can: torch's pinned allocator rounds up to a power of two (a chunk is one) and its blocks are page aligned."""
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    if buf.data_ptr() % ALIGN:
        buf = aligned_slice(torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True), nbytes)
    return buf


def _failure_in_own_thread(fn: Callable[[], None]) -> str | None:
    """Run ``fn`` (CUDA runtime calls) on a thread of its own and return why it failed, or None. Its own thread: a
    failed CUDA runtime call leaves its error as that thread's "last error", which torch would later report from
    an unrelated kernel launch on the calling thread."""
    failure: list[str] = []

    def run() -> None:
        try:
            fn()
        except ShardLoadError as e:
            failure.append(str(e))
        except Exception as e:  # noqa: BLE001 - any failure is reported to the caller, which falls back
            failure.append(f"{type(e).__name__}: {e}")
    t = threading.Thread(target=run, name="gds-sharded-cuda-probe")
    t.start()
    t.join()
    return failure[0] if failure else None


class PinnedReader:
    """One read. Given the rank's file bytes, it starts allocating the staging ring for warm reads (the options'
    chunk) as it is made, so that the allocation overlaps the caller's checks and planning; a cold read
    (O_DIRECT, larger chunks) allocates its own instead. :meth:`close` frees whatever :meth:`read` did not."""

    def __init__(self, opts: RingOptions, device: torch.device, streams: int, file_bytes: int = 0) -> None:
        t0 = time.perf_counter()
        self.opts = opts
        self.staging = CudaStaging(device, streams)
        if file_bytes:
            self.staging.prefetch_ring(ring_slots(opts, opts.chunk_bytes, file_bytes), opts.chunk_bytes)
        self.setup_s = time.perf_counter() - t0

    def read(self, jobs: list[FileJob], verify: bool, landed: Landed | None = None) -> ReadResult:
        staging = self.staging
        try:
            result = read_with_ring(staging, "pinned", self.opts, jobs, verify, landed)
        finally:
            t0 = time.perf_counter()
            staging.close()
            release_s = time.perf_counter() - t0
        times = {**staging.seconds, "setup_s": self.setup_s, "release_s": release_s}
        return dataclasses.replace(result, note="; ".join(n for n in (result.note, staging.note) if n),
                                   detail={**result.detail, **{k: round(v, 4) for k, v in times.items()}})

    def close(self) -> None:
        self.staging.close()
