"""The chunked pipeline shared by the host paths (pinned-to-GPU and CPU).

Files are cut into fixed-size, 4 KiB-aligned chunks. Reader threads take chunks in order from one queue; each
thread owns a few staging slots of the bounded ring and, per chunk, (1) gets the chunk's bytes into one of its
slots through a :class:`Source`, (2) hands each piece that belongs to a tensor to the :class:`Staging` backend,
which copies it straight into the parameter's storage (asynchronously on CUDA streams for the pinned path, a
plain memcpy on CPU), and (3) hashes the chunk while those copies run when verification is on. A slot is reused
only after its copies completed, so host memory is bounded by the ring and nothing is staged whole. Slots are
owned per thread (no dispatcher thread, no head-of-line blocking) and allocated on first use, so the first
reads start while the rest of the ring is still being allocated.

Two sources:

* ``buffered`` / ``direct``: ``preadv`` into the slot (through the page cache, or O_DIRECT for cold files);
* ``mapped``: no staging copy at all. The slot is a window of a read-only mapping of the file (the page cache's
  own pages); on GPUs it is page-locked with ``cudaHostRegister(READ_ONLY)`` for the duration of its copies so
  the copy engine reads the page cache directly. The ring bound then limits how many bytes are locked at once.

Chunks of different files are interleaved so that per-file hashing (sequential by nature) runs in parallel.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
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
from vllm_gds_plugin.loading.readers.mapping import PAGE, FileMapping, resident_fraction
from vllm_gds_plugin.loading.shard_check import check_unchanged

IO_MODES = ("auto", "direct", "buffered", "mapped")
Pieces = tuple[tuple[int, torch.Tensor], ...]  # (offset inside the chunk, destination slice)


class Staging(Protocol):
    """Where chunks are staged and how their pieces reach the destination tensors."""

    def alloc(self, nbytes: int) -> torch.Tensor:
        """One host uint8 slot buffer of ``nbytes``, 4 KiB aligned."""

    def issue(self, slot: int, src: torch.Tensor, pieces: Pieces) -> None:
        """Copy ``src[off:off + len(dst)]`` into every ``dst``; may return before the copies are done."""

    def wait(self, slot: int) -> None:
        """Block until the copies out of ``slot`` are done, so the slot can be refilled."""

    def finish(self) -> None:
        """Block until every issued copy is done."""

    def pin(self, addr: int, nbytes: int) -> None:
        """Make ``nbytes`` of mapped file memory at ``addr`` a valid copy source (page-lock it on GPUs)."""

    def unpin(self, addr: int) -> None:
        """Undo :meth:`pin` (its copies are done)."""

    def pin_unavailable_reason(self, addr: int, nbytes: int) -> str | None:
        """None when :meth:`pin` works on mapped file memory here, else why not (nothing stays pinned)."""


@dataclass(frozen=True)
class Chunk:
    job: int
    index: int  # position within its file (hash order)
    start: int  # file offset, a multiple of the chunk size
    length: int  # file bytes in this chunk (< chunk size only at the end of the file)
    pieces: Pieces


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


def aligned_slice(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The 4 KiB-aligned ``nbytes`` window of ``buf`` (allocated ``nbytes + ALIGN`` long); O_DIRECT needs it."""
    skip = -buf.data_ptr() % ALIGN
    return buf[skip:skip + nbytes]


class Source(Protocol):
    """How a chunk's bytes get into host memory the copies can read."""

    def fill(self, slot: int, c: Chunk) -> tuple[torch.Tensor, memoryview]:
        """The chunk's bytes (a tensor for the copies, a memoryview for hashing), held in ``slot``."""

    def release(self, slot: int) -> None:
        """The copies out of ``slot`` are done."""

    def close(self) -> None:
        """Everything issued is done (also after errors): free what the source holds."""


class ReadSource:
    """``preadv`` into ring slots, allocated on first use."""

    def __init__(self, staging: Staging, jobs: list[FileJob], fds: list[int], nslots: int, chunk_bytes: int,
                 direct: bool) -> None:
        self.staging, self.jobs, self.fds, self.chunk_bytes, self.direct = staging, jobs, fds, chunk_bytes, direct
        self.slots: list[tuple[torch.Tensor, memoryview] | None] = [None] * nslots

    def fill(self, slot: int, c: Chunk) -> tuple[torch.Tensor, memoryview]:
        held = self.slots[slot]
        if held is None:
            buf = self.staging.alloc(self.chunk_bytes)
            held = self.slots[slot] = (buf, memoryview(buf.numpy()))
        got = _read_into(self.fds[c.job], held[1], c.start, c.length, self.direct)
        if got != c.length:
            raise ShardLoadError(f"{self.jobs[c.job].path}: short read at offset {c.start}: got {got} of "
                                 f"{c.length} bytes (file truncated while loading?)")
        return held[0], held[1][:c.length]

    def release(self, slot: int) -> None:
        pass

    def close(self) -> None:
        self.slots = []


class MappedSource:
    """Windows of read-only file mappings, pinned while their copies run: no staging copy."""

    def __init__(self, staging: Staging, maps: list[FileMapping]) -> None:
        self.staging, self.maps = staging, maps
        self.files = [m.tensor() for m in maps]
        self.pinned: dict[int, int] = {}  # slot -> pinned address

    def fill(self, slot: int, c: Chunk) -> tuple[torch.Tensor, memoryview]:
        addr = self.maps[c.job].addr + c.start
        self.staging.pin(addr, -(-c.length // PAGE) * PAGE)  # the mapping extends to the page end
        self.pinned[slot] = addr
        window = self.files[c.job][c.start:c.start + c.length]
        return window, memoryview(window.numpy())

    def release(self, slot: int) -> None:
        self.staging.unpin(self.pinned.pop(slot))

    def close(self) -> None:
        for slot in list(self.pinned):
            self.release(slot)
        self.files = []


class RingPipeline:
    """Runs :func:`plan_chunks` output through ``ring_bytes // chunk_bytes`` slots with ``threads`` readers."""

    def __init__(self, staging: Staging, chunk_bytes: int, ring_bytes: int, threads: int, io: str) -> None:
        if chunk_bytes <= 0 or chunk_bytes % ALIGN:
            raise ShardLoadError(f"chunk size {chunk_bytes} must be a positive multiple of {ALIGN}")
        if io not in ("direct", "buffered", "mapped"):
            raise ShardLoadError(f"ring pipeline io={io!r}: expected 'direct', 'buffered' or 'mapped'")
        self.staging = staging
        self.chunk_bytes = chunk_bytes
        self.ring_bytes = ring_bytes
        self.threads = threads
        self.io = io
        self.note = ""  # why the pipeline used another io than asked (mapped memory could not be pinned)

    def run(self, jobs: list[FileJob], verify: bool) -> int:
        """Fill every segment of ``jobs``; returns the number of file bytes read."""
        chunks = plan_chunks(jobs, self.chunk_bytes, whole_files=verify)
        if not chunks:
            return 0
        needed = sum(c.length for c in chunks)
        nslots = max(1, min(self.ring_bytes // self.chunk_bytes, -(-needed // self.chunk_bytes)))
        digests = OrderedDigests(jobs) if verify else None
        fds: list[int] = []
        maps: list[FileMapping] = []
        try:
            fds.extend(open_file(job.path, self.io == "direct") for job in jobs)
            for job, fd in zip(jobs, fds):
                check_unchanged(fd, job.path, job.identity, "before reading")
            source = self._source(jobs, fds, maps, nslots)
            self._pump(chunks, source, nslots, digests)
            for job, fd in zip(jobs, fds):
                check_unchanged(fd, job.path, job.identity, "after reading")
        except OSError as e:
            raise ShardLoadError(f"reading shard failed: {e}") from e
        finally:
            for m in maps:
                m.close()
            for fd in fds:
                os.close(fd)
        if digests is not None:
            digests.check()
        return needed

    def _source(self, jobs: list[FileJob], fds: list[int], maps: list[FileMapping], nslots: int) -> Source:
        if self.io == "mapped":
            maps.extend(FileMapping(fd, job.size, job.path) for job, fd in zip(jobs, fds))
            first = next(m for m in maps if m.size)
            reason = self.staging.pin_unavailable_reason(first.addr, PAGE)
            if reason is None:
                return MappedSource(self.staging, maps)
            self.io, self.note = "buffered", f"mapped io unavailable ({reason}); read buffered"
        return ReadSource(self.staging, jobs, fds, nslots, self.chunk_bytes, self.io == "direct")

    def _pump(self, chunks: list[Chunk], source: Source, nslots: int, digests: OrderedDigests | None) -> None:
        todo = deque(chunks)  # popleft is atomic: threads take chunks in file-interleaved order
        failed = threading.Event()
        threads = max(1, min(self.threads, nslots, len(chunks)))

        def work(w: int) -> None:
            free, busy = deque(range(w, nslots, threads)), deque[int]()
            try:
                while not failed.is_set():
                    try:
                        c = todo.popleft()
                    except IndexError:
                        break
                    if not free:
                        slot = busy.popleft()
                        self.staging.wait(slot)
                        source.release(slot)
                        free.append(slot)
                    slot = free.popleft()
                    data, view = source.fill(slot, c)
                    busy.append(slot)
                    self.staging.issue(slot, data, c.pieces)
                    if digests is not None:
                        digests.feed(c.job, c.index, view)  # hashes while the copies run
                for slot in busy:
                    self.staging.wait(slot)
                    source.release(slot)
            except BaseException:
                failed.set()
                if digests is not None:
                    digests.abort()  # later chunks of a file must not wait for this one's turn forever
                raise

        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gds-sharded-read")
        try:
            futures = [pool.submit(work, w) for w in range(threads)]
            wait(futures)
            for f in futures:
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.staging.finish()  # never free the ring or unpin under in-flight copies, even on error
            source.close()


@dataclass(frozen=True)
class RingOptions:
    chunk_bytes: int
    ring_bytes: int  # staging memory bound (pinned on CUDA; page-locked page cache in mapped io)
    threads: int
    io: str  # one of IO_MODES
    warm_io: str = "buffered"  # what ``auto`` picks for files mostly in the page cache: "buffered" | "mapped"


def choose_io(jobs: list[FileJob], io: str, warm_io: str) -> str:
    """``direct``, ``buffered`` or ``mapped``. ``auto``: direct when most bytes are not in the page cache and
    the filesystem accepts O_DIRECT (tmpfs does not); ``warm_io`` otherwise (warm data is a copy away)."""
    if io not in IO_MODES:
        raise ShardLoadError(f"model_loader_extra_config io={io!r}: expected one of {list(IO_MODES)}")
    if io in ("buffered", "mapped") or not jobs:
        return "buffered" if io == "auto" else io
    try:
        os.close(open_file(jobs[0].path, direct=True))
    except OSError as e:
        if io == "direct":
            raise ShardLoadError(f"{jobs[0].path}: io='direct' but O_DIRECT open failed: {e}") from e
        return warm_io
    if io == "direct":
        return "direct"
    total = sum(j.size for j in jobs)
    warm = sum(resident_fraction(j.path) * j.size for j in jobs)
    return "direct" if warm < 0.5 * total else warm_io


def read_with_ring(staging: Staging, name: str, opts: RingOptions, jobs: list[FileJob], verify: bool) -> ReadResult:
    """Pick the I/O mode, run the pipeline, and name the mode for the log line (e.g. ``pinned(direct)``)."""
    pipe = RingPipeline(staging, opts.chunk_bytes, opts.ring_bytes, opts.threads,
                        choose_io(jobs, opts.io, opts.warm_io))
    n = pipe.run(jobs, verify)
    return ReadResult(f"{name}({pipe.io})", n, verify, pipe.note)
