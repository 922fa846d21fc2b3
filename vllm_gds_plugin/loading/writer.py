"""Write safetensors files whose tensor data start at 4 KiB-aligned absolute offsets (direct I/O / GDS friendly).

safetensors requires the data section to be covered by tensors without holes, so alignment is made with
(1) spaces at the end of the JSON header (allowed by the format) so the data section starts on a 4 KiB
boundary, and (2) uint8 padding tensors named ``__vllm_gds_pad_<k>`` between real tensors. Padding tensors are
not in the manifest; ``safetensors.safe_open`` reads the files normally.

The layout (header, every tensor's offset, file size) is fixed from names/shapes/dtypes before any data exist,
so a :class:`PartFile` can take tensors as they become final: each is written with large ``pwrite`` calls
straight from the tensor's memory at its offset. Written in layout order (the normal case) the file is hashed on
the way; a tensor written out of order or rewritten makes :meth:`PartFile.finish` re-hash the file instead.
Every tensor's checksum (``kernels/checksum``, what the loader verifies on the GPU) is taken from the bytes as
they are written.
:class:`WriteQueue` takes the tensors in order on one background thread, which hands each tensor's ``pwrite`` to a
few I/O threads (:class:`IOThreads`: several writes in flight, see WRITE_THREADS), the file hashes to another
thread (in file order) and the tensor checksums to a few more (:class:`Hashing`), so writes, hashing and the
caller's loading all overlap.

Shard files are written with ``O_DIRECT`` where the file system takes it (``direct=True``): measured on the
2-core box, a buffered write costs about one CPU second per GB in the kernel (page-cache allocation and copy),
more than the disk takes to store it, while an O_DIRECT write of the same bytes costs almost no CPU (the device
reads the tensor's memory). The layout already puts every tensor at a 4 KiB offset; a tensor's last partial block
(with the zero padding after it) goes through a small aligned bounce block, and a tensor whose memory is not
4 KiB-aligned through an aligned bounce buffer (one memcpy). Where O_DIRECT is refused (tmpfs) the file is
written through the page cache as before.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import xxhash

from vllm_gds_plugin.kernels.checksum import naive as tensor_checksum
from vllm_gds_plugin.loading.manifest import ALIGNMENT, FileEntry, TensorEntry, xxh3_128_file

PAD_PREFIX = "__vllm_gds_pad_"
# __metadata__ key holding the file's own path relative to OUT: the loader refuses a part file found at another
# path (a file of another rank copied in its place) without having to hash it.
PATH_METADATA_KEY = "vllm_gds.path"
_ZEROS = bytes(ALIGNMENT)
_MAX_WRITE = 1 << 30  # one pwrite call; Linux caps a single write just below 2 GiB
_BOUNCE = 32 << 20  # aligned bounce buffer for O_DIRECT writes of tensors whose memory is not 4 KiB-aligned
# torch dtype -> (safetensors dtype tag, manifest dtype name)
_DTYPES: dict[torch.dtype, tuple[str, str]] = {
    torch.float32: ("F32", "float32"), torch.bfloat16: ("BF16", "bfloat16"), torch.float16: ("F16", "float16"),
    torch.float8_e4m3fn: ("F8_E4M3", "float8_e4m3fn"), torch.float8_e5m2: ("F8_E5M2", "float8_e5m2"),
    torch.int64: ("I64", "int64"), torch.int32: ("I32", "int32"), torch.int16: ("I16", "int16"),
    torch.int8: ("I8", "int8"), torch.uint8: ("U8", "uint8"), torch.bool: ("BOOL", "bool"),
}

_T = TypeVar("_T")
Spec = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype) of a tensor to be written


def manifest_dtype(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype][1]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in a shard") from None


def spec_of(name: str, t: torch.Tensor) -> Spec:
    return name, tuple(t.shape), t.dtype


def _nbytes(spec: Spec) -> int:
    numel = 1
    for d in spec[1]:
        numel *= d
    return numel * torch.empty(0, dtype=spec[2]).element_size()


def _align(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class Layout:
    head: bytes  # 8-byte length + JSON header padded so the data section is aligned
    entries: tuple[TensorEntry, ...]  # every real tensor, in file order, with absolute offsets
    size: int  # whole file

    @classmethod
    def of(cls, specs: Sequence[Spec], metadata: dict[str, str], alignment: int = ALIGNMENT) -> Layout:
        """Place ``specs`` in order, each starting at a multiple of ``alignment`` (1: packed, no padding)."""
        header: dict[str, dict] = {"__metadata__": metadata}
        rel: list[tuple[Spec, int, int]] = []
        pos, pads = 0, 0
        for spec in specs:
            name, shape, dtype = spec
            start = _align(pos, alignment)
            if start > pos:
                header[f"{PAD_PREFIX}{pads}"] = {"dtype": "U8", "shape": [start - pos], "data_offsets": [pos, start]}
                pads += 1
            nbytes = _nbytes(spec)
            if dtype not in _DTYPES:
                raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in a shard")
            header[name] = {"dtype": _DTYPES[dtype][0], "shape": list(shape), "data_offsets": [start, start + nbytes]}
            rel.append((spec, start, nbytes))
            pos = start + nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        data_start = _align(8 + len(text), max(alignment, 8))
        text += b" " * (data_start - 8 - len(text))
        entries = tuple(TensorEntry(name, manifest_dtype(dtype), tuple(shape), data_start + start, nbytes)
                        for (name, shape, dtype), start, nbytes in rel)
        return cls(struct.pack("<Q", len(text)) + text, entries, data_start + pos)


class _Bounce(threading.local):
    """Page-aligned scratch memory (anonymous mmap) for O_DIRECT writes, one per writing thread."""

    def get(self, nbytes: int) -> memoryview:
        buf = getattr(self, "buf", None)
        if buf is None or len(buf) < nbytes:
            self.buf = buf = mmap.mmap(-1, max(nbytes, ALIGNMENT))
        return memoryview(buf)[:nbytes]


_bounce = _Bounce()


def _open(path: Path, direct: bool) -> tuple[int, bool]:
    """(fd, whether it is O_DIRECT); falls back to a buffered file where the file system refuses O_DIRECT."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


# pwrite calls in flight at once per WriteQueue. One O_DIRECT write at a time leaves the device idle between a
# tensor's last block and the next tensor's first, which costs most with the small tensors of high TP ranks (2-15
# MB at TP=8 for an 8B model); Lustre spreads concurrent writes over its stripes' servers.
WRITE_THREADS = 4

# Threads computing tensor checksums beside the one hashing files (one thread doing both managed ~6 GB/s: xxh3 21
# GB/s, the checksum 9 GB/s on one core of the 2-core box). One: two were measured on the GPU host only beside the
# (reverted) quantization thread, where every torch thread fought for the 16 cores (checksum work 4.4-8.5 s of
# thread time per 9 GB shard: benchmarks/results/experiments/bench_shard-h100host-20261206-172508-pipelined-quant).
CHECKSUM_THREADS = 1


class IOThreads:
    """The writes of :class:`PartFile` s, ``threads`` at a time, in any order (each to its own offset). The first
    failure is kept (``error``); ``busy`` sums the seconds the writes took over the threads."""

    def __init__(self, threads: int = WRITE_THREADS) -> None:
        if threads < 1:
            raise ValueError(f"write threads must be >= 1, got {threads}")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vllm-gds-io")
        self.busy = 0.0
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., None], *args: object) -> Future[None]:
        def run() -> None:
            t = time.monotonic()
            try:
                fn(*args)
            except BaseException as e:
                self.error = self.error or e
                raise
            finally:
                with self._lock:
                    self.busy += time.monotonic() - t

        return self._pool.submit(run)

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)


class Hashing:
    """Background hashing of :class:`PartFile` data: file xxh3 updates on one thread (they must run in file
    order), tensor checksums on CHECKSUM_THREADS threads (independent). ``busy`` sums the seconds each kind of
    work took (checksum: over its threads), for the sharder's report of where time goes."""

    def __init__(self) -> None:
        self._files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-gds-hash")
        # one OpenMP thread per checksum thread (the count is per calling thread): with the default (all cores)
        # their spinning teams took CPU from the loading and quantizing threads (GPU host, 32-layer TP=8: 102 s
        # of user CPU in a 10 s shard)
        self._checksums = ThreadPoolExecutor(max_workers=CHECKSUM_THREADS, thread_name_prefix="vllm-gds-checksum",
                                             initializer=torch.set_num_threads, initargs=(1,))
        self.busy = {"hash": 0.0, "checksum": 0.0}
        self._lock = threading.Lock()

    def _timed(self, kind: str, fn: Callable[..., _T], *args: object) -> _T:
        t = time.monotonic()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.busy[kind] += time.monotonic() - t

    def file_update(self, fn: Callable[..., _T], *args: object) -> Future[_T]:
        """Run ``fn(*args)`` on the file thread, after everything submitted there before."""
        return self._files.submit(self._timed, "hash", fn, *args)

    def checksum(self, flat: torch.Tensor) -> Future[str]:
        return self._checksums.submit(self._timed, "checksum", tensor_checksum.checksum, flat)

    def close(self, cancel: bool = False) -> None:
        self._files.shutdown(wait=True, cancel_futures=cancel)
        self._checksums.shutdown(wait=True, cancel_futures=cancel)


def _when_all(futures: list[Future], fn: Callable[[], object]) -> None:
    """Call ``fn()`` once every future is done (on the thread that finishes the last one)."""
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            fn()

    for f in futures:
        f.add_done_callback(one_done)


class PartFile:
    """One file of a :class:`Layout` being filled; not thread-safe (use it from one thread, e.g. a WriteQueue).
    With ``hashing``, the file's hash and the tensors' checksums run there, beside the writes instead of between
    them; with ``io``, the writes themselves run there, several at once. ``direct``: write with O_DIRECT where
    possible (the layout must be 4 KiB-aligned, see module doc)."""

    def __init__(self, path: Path, rel_path: str, layout: Layout, hashing: Hashing | None = None,
                 direct: bool = False, io: IOThreads | None = None) -> None:
        self.path, self.rel_path, self.layout = path, rel_path, layout
        self._hashing, self._io = hashing, io
        self._writes: list[Future[None]] = []  # on ``io``, not yet waited for
        self._last_update: Future | None = None  # the latest file hash update handed to hashing
        self._index = {e.name: e for e in layout.entries}
        if direct and (len(layout.head) % ALIGNMENT or any(e.offset % ALIGNMENT for e in layout.entries)):
            raise ValueError(f"{path}: O_DIRECT needs a {ALIGNMENT}-byte aligned layout")
        self._fd, self.direct = _open(path, direct)
        self._hash = xxhash.xxh3_128()
        self._hashed_to = 0  # bytes [0, _hashed_to) hashed in file order; -1: out of order, re-hash at finish
        self._written: set[str] = set()
        self._checksums: dict[str, Future[str] | str] = {}  # per tensor, of the bytes last written
        self._put(0, layout.head, None)

    def _put(self, offset: int, data: memoryview | bytes, address: int | None) -> Future[None] | None:
        """Write ``data`` at ``offset`` (``address``: where its memory starts, for O_DIRECT) and hash it when it
        continues the hashed prefix of the file; with ``io`` the write is queued there (its future returned)."""
        mv = memoryview(data).cast("B")
        write = self._write_direct if self.direct else self._write_buffered
        done = None
        if self._io is None:
            write(offset, mv, address)
        else:  # mv keeps the memory alive until written
            self._writes = [f for f in self._writes if not f.done() or f.exception() is not None]
            done = self._io.submit(write, offset, mv, address)
            self._writes.append(done)
        self._hashed(offset, mv)
        return done

    def _write_buffered(self, offset: int, mv: memoryview, address: int | None) -> None:
        _pwrite_all(self._fd, mv, offset)

    def _hashed(self, offset: int, mv: memoryview) -> None:
        if self._hashed_to == offset:
            if self._hashing is None:
                self._hash.update(mv)
            else:  # mv keeps the tensor's memory alive until hashed
                self._last_update = self._hashing.file_update(self._hash.update, mv)
            self._hashed_to = offset + len(mv)
        elif self._hashed_to >= 0:
            self._hashed_to = -1

    def _write_direct(self, offset: int, mv: memoryview, address: int | None) -> None:
        """O_DIRECT: ``offset`` is block-aligned; the body goes straight from memory (bounced when that memory is
        not aligned), the last partial block with zeros after it (the layout's padding, or beyond the end of
        the file, which :meth:`finish` truncates)."""
        body = len(mv) - len(mv) % ALIGNMENT
        if body and address is not None and address % ALIGNMENT == 0:
            _pwrite_all(self._fd, mv[:body], offset)
        else:
            for start in range(0, body, _BOUNCE):
                n = min(_BOUNCE, body - start)
                chunk = _bounce.get(n)
                chunk[:] = mv[start:start + n]
                _pwrite_all(self._fd, chunk, offset + start)
        if body < len(mv):
            block = _bounce.get(ALIGNMENT)
            tail = len(mv) - body
            block[:tail] = mv[body:]
            block[tail:] = _ZEROS[tail:]
            _pwrite_all(self._fd, block, offset + body)

    def write(self, name: str, t: torch.Tensor, on_done: Callable[[], None] | None = None) -> int:
        """Write tensor ``name`` (shape/dtype as laid out) at its offset, with the padding before it; return
        the bytes written. Writing a tensor again overwrites it (the file is then re-hashed at finish).
        ``on_done`` runs once ``t``'s memory is no longer needed (written, hashed and checksummed)."""
        e = self._index[name]
        if (tuple(t.shape), manifest_dtype(t.dtype)) != (e.shape, e.dtype):
            raise ValueError(f"{self.path}: tensor {name} is {t.dtype}{list(t.shape)}, laid out as "
                             f"{e.dtype}{list(e.shape)}")
        if name in self._written and self._hashed_to >= 0:
            self._hashed_to = -1
        self._written.add(name)
        if self._hashed_to >= 0 and e.offset - self._hashed_to in range(1, ALIGNMENT):
            pad = _ZEROS[: e.offset - self._hashed_to]  # padding in front of it
            if self.direct:  # already on disk: the block after the previous tensor was written zero-filled
                self._hashed(self._hashed_to, memoryview(pad))
            else:
                self._put(self._hashed_to, pad, None)
        flat = tensor_checksum.as_bytes(t)
        self._last_update = None
        written = self._put(e.offset, flat.numpy(), flat.data_ptr())
        if self._hashing is None:
            self._checksums[name] = checksum = tensor_checksum.checksum(flat)
        else:
            self._checksums[name] = checksum = self._hashing.checksum(flat)
        if on_done is not None:  # after its write, its file hash update (if in order) and its checksum
            pending = [f for f in (written, self._last_update, checksum) if isinstance(f, Future)]
            _when_all(pending, on_done) if pending else on_done()
        return flat.numel()

    def _wait_writes(self) -> None:
        """Every queued write done (the first failure raised)."""
        writes, self._writes = self._writes, []
        for f in writes:
            f.result()

    def finish(self, durable: bool = True) -> FileEntry:
        """Check every tensor was written, make padding explicit, fsync (unless not ``durable``: a scratch
        file), close; the manifest entry."""
        missing = [e.name for e in self.layout.entries if e.name not in self._written]
        if missing:
            raise AssertionError(f"{self.path}: tensors never written: {missing[:5]}")
        if not self.direct:
            pos = len(self.layout.head)
            for e in self.layout.entries:  # zero the gaps (holes of an out-of-order write read as zero too)
                if e.offset > pos and self._hashed_to < 0:
                    self._put(pos, _ZEROS[: e.offset - pos], None)
                pos = e.offset + e.nbytes
        self._wait_writes()
        if self.direct:  # padding was written with each tensor's last block; that block may pass the end
            os.ftruncate(self._fd, self.layout.size)
        if durable:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        if os.path.getsize(self.path) != self.layout.size:
            raise AssertionError(f"{self.path}: {os.path.getsize(self.path)} bytes, layout said {self.layout.size}")
        if self._hashed_to != self.layout.size:
            digest = xxh3_128_file(self.path)
        elif self._hashing is None:
            digest = self._hash.hexdigest()
        else:  # after this file's queued updates (the file thread is FIFO)
            digest = self._hashing.file_update(self._hash.hexdigest).result()
        entries = tuple(dataclasses.replace(e, checksum=_result(self._checksums[e.name])) for e in self.layout.entries)
        return FileEntry(self.rel_path, self.layout.size, digest, entries)

    def abort(self) -> None:
        for f in self._writes:  # never close the descriptor under a queued write (its number may be reused)
            f.cancel()
        for f in self._writes:
            if not f.cancelled():
                f.exception()
        self._writes = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _result(value: Future[str] | str) -> str:
    return value.result() if isinstance(value, Future) else value


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:done + _MAX_WRITE], offset + done)


class WriteQueue:
    """One background thread taking tasks in submission order (a PartFile's tensors, in order), whose files write
    through ``io`` (``write_threads`` writes at once) and hash through ``hashing``. The first failure of a task or
    a write is kept and re-raised by :meth:`check` / :meth:`drain` (later tasks are skipped), so a disk-full error
    surfaces in the caller. ``busy`` sums the seconds of each kind of work (write: the pwrite calls over the I/O
    threads; queue: the ordered thread's tasks)."""

    def __init__(self, write_threads: int = WRITE_THREADS) -> None:
        self.io = IOThreads(write_threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-gds-writer")
        self.hashing = Hashing()
        self._queue_s = 0.0
        self._error: BaseException | None = None
        self._last: Future | None = None

    @property
    def busy(self) -> dict[str, float]:
        return {"write": self.io.busy, "queue": self._queue_s, **self.hashing.busy}

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        def run() -> object:
            if self.error is not None:  # everything after a failed write fails the same way
                raise self.error
            t = time.monotonic()
            try:
                return fn(*args)
            except BaseException as e:
                self._error = e
                raise
            finally:
                self._queue_s += time.monotonic() - t

        self._last = self._pool.submit(run)
        return self._last

    @property
    def error(self) -> BaseException | None:
        """The first failure of a task or a write, if any."""
        return self._error or self.io.error

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        """Wait for every task submitted so far (their writes may still be running: PartFile.finish waits)."""
        if self._last is not None:
            self._last.exception()
        self.check()

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)  # first: its tasks queue writes
        self.io.close(cancel)
        self.hashing.close(cancel)


def write_aligned_safetensors(path: Path, tensors: Sequence[tuple[str, torch.Tensor]], rel_path: str,
                              on_bytes: Callable[[int], None] | None = None) -> FileEntry:
    """Write ``tensors`` (in order) to ``path`` now; return its manifest entry (size, xxh3-128, tensor offsets and
    checksums)."""
    part = PartFile(path, rel_path, Layout.of([spec_of(n, t) for n, t in tensors], {PATH_METADATA_KEY: rel_path}))
    try:
        for name, t in tensors:
            n = part.write(name, t)
            if on_bytes:
                on_bytes(n)
        return part.finish()
    finally:
        part.abort()


def split_specs(specs: Iterable[Spec], max_file_size: int) -> list[list[Spec]]:
    """Group tensor specs (keeping order) into files of at most ``max_file_size`` data bytes (a larger tensor
    gets a file of its own)."""
    return _split(specs, _nbytes, max_file_size)


def split_parts(tensors: Iterable[tuple[str, torch.Tensor]], max_file_size: int,
                ) -> list[list[tuple[str, torch.Tensor]]]:
    """:func:`split_specs` for (name, tensor) pairs."""
    return _split(tensors, lambda nt: nt[1].numel() * nt[1].element_size(), max_file_size)


def _split(items: Iterable, nbytes: Callable[[object], int], max_file_size: int) -> list[list]:
    parts: list[list] = [[]]
    used = 0
    for item in items:
        n = _align(nbytes(item))
        if parts[-1] and used + n > max_file_size:
            parts.append([])
            used = 0
        parts[-1].append(item)
        used += n
    return parts
