"""The chunked pipeline shared by the host paths (pinned-to-GPU and CPU).

Files are cut into fixed-size, 4 KiB-aligned chunks. Reader threads take chunks in order from one queue; each
thread owns ``slots`` staging slots of the bounded ring and, per chunk, (1) makes sure one of its slots is free
(its copies done, its bytes hashed) *before* taking the chunk, so a taken chunk is never held up behind a slot
wait (which would stall every later chunk of its file on the hash order), (2) gets the chunk's bytes into the
slot through a :class:`Source`, hashing them piece by piece as they arrive when verification is on and it is
the file's turn (:class:`~vllm_gds_plugin.loading.readers.base.OrderedDigests`), (3) hands each piece that
belongs to a tensor to the :class:`Staging` backend, which copies it straight into the parameter's storage
(asynchronously on CUDA streams for the pinned path, a plain memcpy on CPU), and moves on to its next chunk
while those copies run. A slot is reused only after its copies completed, so host memory is bounded by the
ring and nothing is staged whole. Slots are owned per thread (no dispatcher thread, no head-of-line blocking);
the ring is allocated in one piece before the readers start (on GPUs one page-locked huge-page region: ~7 ms
for 96 MiB, where per-slot pinned allocations cost the readers ~40 ms of their start).

The ring holds ``min(threads * slots, ring_bytes // chunk_bytes)`` chunks; the layout actually used and where
the threads spent their time (read, hash, slot wait, copy issue; summed over threads) are reported in the
result's ``detail``.

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
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from vllm_gds_plugin.loading.readers.base import (
    ALIGN,
    FileJob,
    Landed,
    OrderedDigests,
    ReadResult,
    Segment,
    ShardLoadError,
    open_file,
)
from vllm_gds_plugin.loading.readers.mapping import PAGE, FileMapping, resident_fraction
from vllm_gds_plugin.loading.shard_check import check_unchanged

IO_MODES = ("auto", "direct", "buffered", "mapped")
# Verification hashes a chunk in pieces of this size as they are read, while they are still in the reader's
# L2 cache (xxh3-128: ~60 GB/s per core on 1 MiB pieces, ~20-28 GB/s on 16 MiB chunks measured on the CPU box).
HASH_PIECE = 1 << 20
# (offset inside the chunk, destination address, bytes): plain ints, because a reader thread issues a chunk's
# copies holding the GIL and thousands of chunks go through it (a tensor slice per piece cost more than the copy).
Pieces = tuple[tuple[int, int, int], ...]


class Staging(Protocol):
    """Where chunks are staged and how their pieces reach the destination tensors."""

    def alloc_ring(self, count: int, nbytes: int) -> list[torch.Tensor]:
        """``count`` host uint8 slot buffers of ``nbytes``, 4 KiB aligned (held until :meth:`close`)."""

    def issue(self, slot: int, src: torch.Tensor, pieces: Pieces) -> None:
        """Copy ``n`` bytes at ``src[off:]`` to address ``dst`` for every ``(off, dst, n)``; may return before
        the copies are done."""

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

    def close(self) -> None:
        """Everything is done: free the ring."""


class Chunk(NamedTuple):  # a tuple: thousands are planned per load, a frozen dataclass is ~5x slower to build
    job: int
    index: int  # position within its file (hash order)
    start: int  # file offset, a multiple of the chunk size
    length: int  # file bytes in this chunk (< chunk size only at the end of the file)
    pieces: Pieces
    segments: tuple[int, ...]  # indexes into the job's segments of the tensors the pieces belong to


def _file_chunks(j: int, job: FileJob, chunk_bytes: int, whole_files: bool) -> Iterator[Chunk]:
    """File ``j`` cut into chunks with each tensor's bytes mapped onto them; without ``whole_files`` (no file
    hashing) chunks holding no tensor bytes (e.g. the header) are skipped."""
    # Plain (offset, end, address, index) per non-empty tensor: this loop runs per chunk, thousands of times per
    # load, and a tensor attribute costs a microsecond.
    spans = [(seg.offset, seg.end, seg.dest.data_ptr(), k) for k, seg in enumerate(job.segments) if seg.nbytes]
    first = 0
    for index, start in enumerate(range(0, job.size, chunk_bytes)):
        end = min(start + chunk_bytes, job.size)
        while first < len(spans) and spans[first][1] <= start:
            first += 1
        pieces, segs = [], []
        for i in range(first, len(spans)):
            offset, seg_end, addr, k = spans[i]
            if offset >= end:
                break
            lo, hi = max(offset, start), min(seg_end, end)
            pieces.append((lo - start, addr + lo - offset, hi - lo))
            segs.append(k)
        if pieces or whole_files:
            yield Chunk(j, index, start, end - start, tuple(pieces), tuple(segs))


def _round_robin(files: list[Iterator[Chunk]]) -> Iterator[Chunk]:
    while files:
        alive = []
        for it in files:
            c = next(it, None)
            if c is not None:
                alive.append(it)
                yield c
        files = alive


class ChunkPlan:
    """Every file cut into chunks (:func:`_file_chunks`), files interleaved round-robin, planned lazily as the
    reader threads :meth:`take` them: a chunk costs microseconds of Python (5.6 ms for 9 GB of 4 MiB chunks on
    the H100 machine), which then runs while other threads wait on their reads instead of before the first."""

    def __init__(self, jobs: list[FileJob], chunk_bytes: int, whole_files: bool) -> None:
        self.chunk_bytes = chunk_bytes
        self.bytes_taken = 0
        self._chunks = _round_robin([_file_chunks(j, job, chunk_bytes, whole_files) for j, job in enumerate(jobs)])
        self._lock = threading.Lock()

    def take(self) -> Chunk | None:
        """The next chunk, None when all are taken (any thread)."""
        with self._lock:
            c = next(self._chunks, None)
            if c is not None:
                self.bytes_taken += c.length
            return c

    def chunks_holding(self, seg: Segment) -> int:
        """How many chunks hold bytes of ``seg`` (0 for an empty one)."""
        return (seg.end - 1) // self.chunk_bytes - seg.offset // self.chunk_bytes + 1 if seg.nbytes else 0


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


HashFn = Callable[[memoryview], None]


class Source(Protocol):
    """How a chunk's bytes get into host memory the copies can read."""

    reads: bool  # True: fill() moves the bytes itself, so it can hash them as they arrive

    def fill(self, slot: int, c: Chunk, hash_piece: HashFn | None) -> tuple[torch.Tensor, memoryview]:
        """The chunk's bytes (a tensor for the copies, a memoryview for hashing), held in ``slot``; when the
        source ``reads``, ``hash_piece`` (if given) is fed the chunk's bytes in order as they arrive."""

    def release(self, slot: int) -> None:
        """The copies out of ``slot`` are done."""

    def close(self) -> None:
        """Everything issued is done (also after errors): free what the source holds."""


class ReadSource:
    """``preadv`` into the ring's slots."""

    reads = True

    def __init__(self, staging: Staging, jobs: list[FileJob], fds: list[int], nslots: int, chunk_bytes: int,
                 direct: bool) -> None:
        self.jobs, self.fds, self.direct = jobs, fds, direct
        self.slots = [(buf, memoryview(buf.numpy())) for buf in staging.alloc_ring(nslots, chunk_bytes)]

    def fill(self, slot: int, c: Chunk, hash_piece: HashFn | None) -> tuple[torch.Tensor, memoryview]:
        held = self.slots[slot]
        view = held[1]
        if hash_piece is None:
            got = _read_into(self.fds[c.job], view, c.start, c.length, self.direct)
        else:  # read and hash piece by piece: each piece is hashed while it is still in cache
            got = 0
            while got < c.length:
                want = min(HASH_PIECE, c.length - got)
                n = _read_into(self.fds[c.job], view[got:], c.start + got, want, self.direct)
                hash_piece(view[got:got + n])
                got += n
                if n < want:
                    break
        if got != c.length:
            raise ShardLoadError(f"{self.jobs[c.job].path}: short read at offset {c.start}: got {got} of "
                                 f"{c.length} bytes (file truncated while loading?)")
        return held[0], view[:c.length]

    def release(self, slot: int) -> None:
        pass

    def close(self) -> None:
        self.slots = []


class MappedSource:
    """Windows of read-only file mappings, pinned while their copies run: no staging copy."""

    reads = False

    def __init__(self, staging: Staging, maps: list[FileMapping]) -> None:
        self.staging, self.maps = staging, maps
        self.files = [m.tensor() for m in maps]
        self.pinned: dict[int, int] = {}  # slot -> pinned address

    def fill(self, slot: int, c: Chunk, hash_piece: HashFn | None) -> tuple[torch.Tensor, memoryview]:
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


class _Clock:
    """Seconds one reader thread spends per phase (merged into the pipeline's ``detail`` when it ends)."""

    def __init__(self) -> None:
        self.seconds = {"read_s": 0.0, "hash_s": 0.0, "slot_wait_s": 0.0, "issue_s": 0.0}
        self._t = time.perf_counter()

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        self.seconds[key] += now - self._t
        self._t = now


class LandingCounter:
    """Tells ``landed`` about each tensor once the last chunk holding its bytes has been retired (its copies
    done). Chunks go out round-robin over the files, so files complete together at the end but tensors complete
    all along the load."""

    def __init__(self, jobs: list[FileJob], plan: ChunkPlan, landed: Landed) -> None:
        self._left = [[plan.chunks_holding(seg) for seg in job.segments] for job in jobs]
        self._landed = landed
        self._lock = threading.Lock()

    def retired(self, c: Chunk) -> None:
        done = []
        with self._lock:
            left = self._left[c.job]
            for k in c.segments:
                left[k] -= 1
                if left[k] == 0:
                    done.append((c.job, k))
        if done:
            self._landed(done)


@dataclass(frozen=True)
class RingOptions:
    chunk_bytes: int
    ring_bytes: int  # staging memory bound (pinned on CUDA; page-locked page cache in mapped io)
    threads: int
    io: str  # one of IO_MODES
    warm_io: str = "buffered"  # what ``auto`` picks for files mostly in the page cache: "buffered" | "mapped"
    slots: int = 2  # staging slots per reader thread (>= 2: the next read overlaps the previous chunk's copies)
    bulk_chunk_bytes: int | None = None  # the chunk for O_DIRECT reads and for verification (None: chunk_bytes)

    def chunk_for(self, io: str, verify: bool) -> int:
        bulk = io == "direct" or verify
        return self.bulk_chunk_bytes if bulk and self.bulk_chunk_bytes else self.chunk_bytes


def ring_slots(opts: RingOptions, chunk_bytes: int, file_bytes: int) -> int:
    """Slots of the ring for reading ``file_bytes`` in ``chunk_bytes`` chunks."""
    return max(1, min(opts.threads * opts.slots, opts.ring_bytes // chunk_bytes, -(-file_bytes // chunk_bytes)))


class RingPipeline:
    """Runs a :class:`ChunkPlan` through ``min(threads * slots, ring_bytes // chunk_bytes)`` slots with up to
    ``threads`` readers; ``detail`` holds the layout used and the per-phase seconds after :meth:`run`."""

    def __init__(self, staging: Staging, opts: RingOptions, io: str) -> None:
        for chunk in {opts.chunk_bytes, opts.bulk_chunk_bytes or opts.chunk_bytes}:
            if chunk <= 0 or chunk % ALIGN:
                raise ShardLoadError(f"chunk size {chunk} must be a positive multiple of {ALIGN}")
        if io not in ("direct", "buffered", "mapped"):
            raise ShardLoadError(f"ring pipeline io={io!r}: expected 'direct', 'buffered' or 'mapped'")
        self.staging = staging
        self.opts = opts
        self.io = io
        self.note = ""  # why the pipeline used another io than asked (mapped memory could not be pinned)
        self.detail: dict[str, float] = {}

    def run(self, jobs: list[FileJob], verify: bool, landed: Landed | None = None) -> int:
        """Fill every segment of ``jobs`` (telling ``landed`` about each as its copies finish); returns the
        number of file bytes read."""
        chunk = self.opts.chunk_for(self.io, verify)
        file_bytes = sum(job.size for job in jobs)
        if not file_bytes:
            return 0
        nslots = ring_slots(self.opts, chunk, file_bytes)
        threads = max(1, min(self.opts.threads, nslots))
        self.detail = {"threads": threads, "slots_per_thread": round(nslots / threads, 2),
                       "chunk_mib": chunk / (1 << 20), "ring_mib": nslots * chunk / (1 << 20)}
        plan = ChunkPlan(jobs, chunk, whole_files=verify)
        digests = OrderedDigests(jobs) if verify else None
        fds: list[int] = []
        maps: list[FileMapping] = []
        try:
            fds.extend(open_file(job.path, self.io == "direct") for job in jobs)
            for job, fd in zip(jobs, fds):
                check_unchanged(fd, job.path, job.identity, "before reading")
            source = self._source(jobs, fds, maps, nslots, chunk)
            counter = None if landed is None else LandingCounter(jobs, plan, landed)
            self._pump(plan, source, nslots, threads, digests, counter)
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
        return plan.bytes_taken

    def _source(self, jobs: list[FileJob], fds: list[int], maps: list[FileMapping], nslots: int,
                chunk: int) -> Source:
        if self.io == "mapped":
            maps.extend(FileMapping(fd, job.size, job.path) for job, fd in zip(jobs, fds))
            first = next(m for m in maps if m.size)
            reason = self.staging.pin_unavailable_reason(first.addr, PAGE)
            if reason is None:
                return MappedSource(self.staging, maps)
            self.io, self.note = "buffered", f"mapped io unavailable ({reason}); read buffered"
        return ReadSource(self.staging, jobs, fds, nslots, chunk, self.io == "direct")

    def _pump(self, plan: ChunkPlan, source: Source, nslots: int, threads: int,
              digests: OrderedDigests | None, counter: LandingCounter | None) -> None:
        failed = threading.Event()
        clocks: list[_Clock] = []

        def work(w: int) -> None:
            clock = _Clock()
            clocks.append(clock)
            # busy: (slot, the chunk whose copies it feeds), oldest first
            free, busy = deque(range(w, nslots, threads)), deque[tuple[int, Chunk]]()
            hashed: dict[int, threading.Event] = {}  # slot -> set once its deposited chunk is hashed

            def retire(slot: int, c: Chunk) -> None:
                self.staging.wait(slot)
                if (ev := hashed.pop(slot, None)) is not None:
                    ev.wait()
                source.release(slot)
                if counter is not None:
                    counter.retired(c)

            def hash_piece(job: int) -> HashFn:
                def feed(data: memoryview) -> None:
                    clock.lap("read_s")
                    digests.update(job, data)  # type: ignore[union-attr]
                    clock.lap("hash_s")
                return feed

            try:
                while not failed.is_set():
                    if not free:  # a free slot first: a chunk once taken is read without waiting
                        slot, done = busy.popleft()
                        retire(slot, done)
                        free.append(slot)
                        clock.lap("slot_wait_s")
                    if (c := plan.take()) is None:
                        break
                    slot = free.popleft()
                    claimed = digests is not None and digests.claim(c.job, c.index)
                    inline = hash_piece(c.job) if claimed and source.reads else None
                    data, view = source.fill(slot, c, inline)
                    busy.append((slot, c))
                    clock.lap("read_s")
                    self.staging.issue(slot, data, c.pieces)
                    clock.lap("issue_s")
                    if digests is not None:  # hashing runs while the copies just issued run
                        if claimed:
                            if inline is None:
                                digests.update(c.job, view)
                            digests.release(c.job, c.index)
                        else:
                            hashed[slot] = threading.Event()
                            digests.deposit(c.job, c.index, view, hashed[slot])
                        clock.lap("hash_s")
                for slot, done in busy:
                    retire(slot, done)
                clock.lap("slot_wait_s")
            except BaseException:
                failed.set()
                if digests is not None:
                    digests.abort()  # chunks deposited behind this one must not wait for it forever
                raise

        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gds-sharded-read")
        start = time.perf_counter()
        try:
            futures = [pool.submit(work, w) for w in range(threads)]
            wait(futures)
            for f in futures:
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.staging.finish()  # never free the ring or unpin under in-flight copies, even on error
            source.close()
            self.detail["pump_s"] = time.perf_counter() - start
            for clock in clocks:
                for key, sec in clock.seconds.items():
                    self.detail[key] = self.detail.get(key, 0.0) + sec


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


def read_with_ring(staging: Staging, name: str, opts: RingOptions, jobs: list[FileJob], verify: bool,
                   landed: Landed | None = None) -> ReadResult:
    """Pick the I/O mode, run the pipeline, and name the mode for the log line (e.g. ``pinned(direct)``)."""
    t = time.perf_counter()
    io = choose_io(jobs, opts.io, opts.warm_io)
    choose_s = time.perf_counter() - t
    pipe = RingPipeline(staging, opts, io)
    n = pipe.run(jobs, verify, landed)
    detail = {"choose_io_s": choose_s, **pipe.detail}
    return ReadResult(f"{name}({pipe.io})", n, verify, pipe.note, {k: round(v, 4) for k, v in detail.items()})
