"""The chunked read pipeline shared by the host paths (pinned-to-GPU and CPU).

Files are read in fixed-size, 4 KiB-aligned chunks by a thread pool into a bounded ring of staging slots; as soon
as a chunk is in its slot, the worker hands each piece of it that belongs to a tensor to the :class:`Staging`
backend, which copies it straight into the parameter's storage (asynchronously on CUDA streams for the pinned
path, a plain memcpy on CPU). While those copies run the worker hashes the chunk when verification is on. A slot
is reused only after its copies completed, so host memory is bounded by the ring and nothing is staged whole.

Chunks of different files are interleaved so that per-file hashing (sequential by nature) runs in parallel.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest
from typing import Protocol

import torch

from vllm_gds_plugin.loading.readers.base import (
    ALIGN,
    FileJob,
    OrderedDigests,
    ReadResult,
    ShardLoadError,
    open_file,
)
from vllm_gds_plugin.loading.shard_check import check_unchanged


class Staging(Protocol):
    """Where chunks are staged and how their pieces reach the destination tensors."""

    def alloc(self, nbytes: int) -> torch.Tensor:
        """One host uint8 buffer of ``nbytes`` (the whole ring), 4 KiB aligned."""

    def copy(self, slot: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy ``src`` (a piece of slot ``slot``) into ``dst``; may return before the copy is done."""

    def mark(self, slot: int) -> None:
        """All copies out of ``slot`` have been issued (called by the worker that filled it)."""

    def wait(self, slot: int) -> None:
        """Block until the copies out of ``slot`` are done, so the slot can be refilled."""

    def finish(self) -> None:
        """Block until every issued copy is done."""


@dataclass(frozen=True)
class Chunk:
    job: int
    index: int  # position within its file (hash order)
    start: int  # file offset, a multiple of the chunk size
    length: int  # file bytes in this chunk (< chunk size only at the end of the file)
    pieces: tuple[tuple[int, torch.Tensor], ...]  # (offset inside the chunk, destination slice)


def plan_chunks(jobs: list[FileJob], chunk_bytes: int, whole_files: bool) -> list[Chunk]:
    """Cut every file into chunks and map each tensor's bytes onto them; files interleaved round-robin.

    Without ``whole_files`` (no verification) chunks holding no tensor bytes (e.g. the header) are skipped."""
    per_file: list[list[Chunk]] = []
    for j, job in enumerate(jobs):
        chunks: list[Chunk] = []
        segs = job.segments
        first = 0
        for index, start in enumerate(range(0, job.size, chunk_bytes)):
            end = min(start + chunk_bytes, job.size)
            while first < len(segs) and segs[first].end <= start:
                first += 1
            pieces = []
            for seg in segs[first:]:
                if seg.offset >= end:
                    break
                lo, hi = max(seg.offset, start), min(seg.end, end)
                pieces.append((lo - start, seg.dest[lo - seg.offset:hi - seg.offset]))
            if pieces or whole_files:
                chunks.append(Chunk(j, index, start, end - start, tuple(pieces)))
        per_file.append(chunks)
    return [c for group in zip_longest(*per_file) for c in group if c is not None]


def _read_into(fd: int, buf: memoryview, offset: int, want: int, direct: bool) -> int:
    """pread until ``want`` bytes or EOF. O_DIRECT needs block-multiple lengths, so it asks for the rounded-up
    size and gets the short tail at EOF."""
    ask = -(-want // ALIGN) * ALIGN if direct else want
    got = 0
    while got < want:
        n = os.preadv(fd, [buf[got:ask]], offset + got)
        if n <= 0:
            break
        got += n
    return min(got, want)


class RingPipeline:
    """Runs :func:`plan_chunks` output through ``slots`` staging slots with ``threads`` readers."""

    def __init__(self, staging: Staging, chunk_bytes: int, ring_bytes: int, threads: int, direct: bool) -> None:
        if chunk_bytes <= 0 or chunk_bytes % ALIGN:
            raise ShardLoadError(f"chunk size {chunk_bytes} must be a positive multiple of {ALIGN}")
        self.staging = staging
        self.chunk_bytes = chunk_bytes
        self.ring_bytes = ring_bytes
        self.threads = threads
        self.direct = direct

    def run(self, jobs: list[FileJob], verify: bool) -> int:
        """Fill every segment of ``jobs``; returns the number of file bytes read."""
        chunks = plan_chunks(jobs, self.chunk_bytes, whole_files=verify)
        if not chunks:
            return 0
        needed = sum(c.length for c in chunks)
        nslots = max(1, min(self.ring_bytes // self.chunk_bytes, -(-needed // self.chunk_bytes)))
        ring = self.staging.alloc(nslots * self.chunk_bytes)
        slots = [ring[i * self.chunk_bytes:(i + 1) * self.chunk_bytes] for i in range(nslots)]
        views = [memoryview(s.numpy()) for s in slots]
        digests = OrderedDigests(jobs) if verify else None
        fds: list[int] = []
        try:
            fds.extend(open_file(job.path, self.direct) for job in jobs)
            for job, fd in zip(jobs, fds):
                check_unchanged(fd, job.path, job.identity, "before reading")
            self._pump(chunks, jobs, fds, slots, views, digests)
            for job, fd in zip(jobs, fds):
                check_unchanged(fd, job.path, job.identity, "after reading")
        finally:
            for fd in fds:
                os.close(fd)
        if digests is not None:
            digests.check()
        return needed

    def _pump(self, chunks: list[Chunk], jobs: list[FileJob], fds: list[int], slots: list[torch.Tensor],
              views: list[memoryview], digests: OrderedDigests | None) -> None:
        def work(slot: int, c: Chunk) -> None:
            try:
                fill(slot, c)
            except BaseException:
                if digests is not None:
                    digests.abort()  # later chunks of this file must not wait for its turn forever
                raise

        def fill(slot: int, c: Chunk) -> None:
            got = _read_into(fds[c.job], views[slot], c.start, c.length, self.direct)
            if got != c.length:
                raise ShardLoadError(f"{jobs[c.job].path}: short read at offset {c.start}: got {got} of "
                                     f"{c.length} bytes (file truncated while loading?)")
            for off, dst in c.pieces:
                self.staging.copy(slot, slots[slot][off:off + dst.numel()], dst)
            self.staging.mark(slot)
            if digests is not None:
                digests.feed(c.job, c.index, views[slot][:c.length])  # hashes while the copies run

        free = deque(range(len(slots)))
        busy: deque[tuple[int, Future[None]]] = deque()
        pool = ThreadPoolExecutor(max_workers=min(self.threads, len(slots)), thread_name_prefix="gds-sharded-read")
        try:
            for c in chunks:
                if not free:
                    slot, fut = busy.popleft()
                    fut.result()
                    self.staging.wait(slot)
                    free.append(slot)
                slot = free.popleft()
                busy.append((slot, pool.submit(work, slot, c)))
            for _, fut in busy:
                fut.result()
        except OSError as e:
            raise ShardLoadError(f"reading shard failed: {e}") from e
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.staging.finish()  # never free the ring under in-flight copies, even on error


@dataclass(frozen=True)
class RingOptions:
    chunk_bytes: int
    ring_bytes: int  # staging memory bound (pinned on CUDA)
    threads: int
    io: str  # "auto" | "direct" | "buffered"


def aligned_slice(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The 4 KiB-aligned ``nbytes`` window of ``buf`` (allocated ``nbytes + ALIGN`` long); O_DIRECT needs it."""
    skip = -buf.data_ptr() % ALIGN
    return buf[skip:skip + nbytes]


def resident_fraction(path: os.PathLike[str] | str) -> float:
    """Share of a file's pages in the page cache (mincore); warm files are read buffered, cold ones direct."""
    import ctypes
    import mmap

    import numpy as np

    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    vec = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed", str(path))
        try:
            if libc.mincore(addr, size, vec.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", str(path))
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return float((vec & 1).mean())


def choose_direct(jobs: list[FileJob], io: str) -> bool:
    """O_DIRECT or buffered reads. ``auto``: direct when most bytes are not in the page cache and the
    filesystem accepts O_DIRECT (tmpfs does not); buffered otherwise (warm data is a memcpy away)."""
    if io not in ("auto", "direct", "buffered"):
        raise ShardLoadError(f"model_loader_extra_config io={io!r}: expected 'auto', 'direct' or 'buffered'")
    if io == "buffered" or not jobs:
        return False
    try:
        os.close(open_file(jobs[0].path, direct=True))
    except OSError as e:
        if io == "direct":
            raise ShardLoadError(f"{jobs[0].path}: io='direct' but O_DIRECT open failed: {e}") from e
        return False
    if io == "direct":
        return True
    total = sum(j.size for j in jobs)
    warm = sum(resident_fraction(j.path) * j.size for j in jobs)
    return warm < 0.5 * total


def read_with_ring(staging: Staging, name: str, opts: RingOptions, jobs: list[FileJob], verify: bool) -> ReadResult:
    """Pick the I/O mode, run the pipeline, and name the mode for the log line (e.g. ``pinned(direct)``)."""
    direct = choose_direct(jobs, opts.io)
    pipe = RingPipeline(staging, opts.chunk_bytes, opts.ring_bytes, opts.threads, direct)
    n = pipe.run(jobs, verify)
    return ReadResult(f"{name}({'direct' if direct else 'buffered'})", n, verify)
