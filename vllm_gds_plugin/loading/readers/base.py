"""What every read path shares: the plan it executes, the result it reports, its error type.

A :class:`FileJob` lists, for one shard file, which byte ranges go into which destination tensor (a flat
``uint8`` view of a parameter's own storage, on whatever device the parameter lives). A reader moves those bytes
and, when asked, checks the file's xxh3-128 digest. Readers never allocate destination memory and never stage a
whole file: that is what keeps extra device memory at zero and host memory bounded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import xxhash

ALIGN = 4096  # O_DIRECT and cuFile alignment; shard tensors start on multiples of it (manifest.ALIGNMENT)


class ShardLoadError(RuntimeError):
    """Loading a gds-sharded checkpoint was refused or failed; the message names the file/field and both sides."""


@dataclass(frozen=True)
class Segment:
    """``nbytes`` bytes at absolute ``offset`` of a file go to ``dest`` (1-D uint8, exactly ``nbytes`` long)."""

    name: str
    offset: int
    dest: torch.Tensor
    checksum: str | None = None  # the manifest's (version 2) checksum of these bytes, see loading/tensor_checks.py

    @property
    def nbytes(self) -> int:
        return self.dest.numel()

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class FileJob:
    path: Path
    size: int
    segments: tuple[Segment, ...]  # sorted by offset, non-overlapping
    xxh3_128: str  # expected digest of the whole file
    # (dev, inode, size, mtime_ns, ctime_ns) when the file was checked; readers refuse a file that no longer
    # matches when they open it or when they are done with it (shard_check.check_unchanged). None: not checked.
    identity: tuple[int, int, int, int, int] | None = None


@dataclass(frozen=True)
class ReadResult:
    mode: str  # e.g. "gds(direct)", "pinned(buffered)", "pinned(mapped)", "host(direct)"
    bytes_read: int
    verified: bool
    note: str = ""  # e.g. why another io than asked was used; appended to the log line
    # Seconds spent in parts of the path worth knowing (page-locking mapped memory), summed over threads.
    detail: dict[str, float] = field(default_factory=dict)


# ``(job index, segment index)`` pairs whose bytes are in place (their copies done), reported by a reader as soon
# as it knows, from any of its threads, so checks can run while it still reads. A reader that cannot tell early
# reports nothing: its caller takes every segment as landed once ``read`` returns.
Landed = Callable[[list[tuple[int, int]]], None]


class Reader(Protocol):
    """One I/O path. ``read`` fills every segment of every job or raises :class:`ShardLoadError`; ``close``
    frees what the reader holds, whether or not it read (call it in every case)."""

    def read(self, jobs: list[FileJob], verify: bool, landed: Landed | None = None) -> ReadResult: ...

    def close(self) -> None: ...


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of a contiguous tensor's storage (no copy), the form readers write into."""
    if not t.is_contiguous():
        raise ShardLoadError("destination tensor is not contiguous; cannot write shard bytes into it in place")
    return t.detach().reshape(-1).view(torch.uint8)


def open_file(path: Path, direct: bool) -> int:
    """Open a shard for reading, with O_DIRECT when asked (raises OSError where the filesystem refuses it)."""
    return os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))


class OrderedDigests:
    """Per-file xxh3-128 fed from several reader threads, in file order, without making any thread wait its turn.

    The manifest holds one digest per whole file, so chunk ``k`` of a file must be hashed after chunk ``k-1``.
    A reader that takes the file's next chunk while nobody hashes that file :meth:`claim` s it and hashes it
    piece by piece while reading (the bytes are still in its L2 cache: ~60 GB/s per core instead of ~20 from
    DRAM), then :meth:`release` s it. A reader whose chunk is not next :meth:`deposit` s it and moves on to
    its next read; whoever advances the file to that chunk hashes it and sets its event, which is what the
    depositor waits for before reusing the slot. So no reader ever blocks on another file's or chunk's turn
    (the blocking hand-off cost 33% of the load time on the H100), and files still hash in parallel (xxhash
    releases the GIL).
    """

    def __init__(self, jobs: list[FileJob]) -> None:
        self._jobs = jobs
        self._hashers = [xxhash.xxh3_128() for _ in jobs]
        self._next = [0] * len(jobs)  # index of the chunk each file hashes next
        self._busy = [False] * len(jobs)  # a thread holds the file's turn (claimed chunk or draining)
        self._pending: list[dict[int, tuple[memoryview, threading.Event]]] = [{} for _ in jobs]
        self._aborted = False
        self._lock = threading.Lock()

    def claim(self, job: int, index: int) -> bool:
        """True: the caller holds file ``job``'s turn for chunk ``index`` and must feed it to :meth:`update`
        (in order) and then call :meth:`release`."""
        with self._lock:
            if self._aborted or self._busy[job] or self._next[job] != index:
                return False
            self._busy[job] = True
            return True

    def update(self, job: int, data: memoryview) -> None:
        """Hash the next bytes of a claimed chunk (only by the thread holding the turn)."""
        self._hashers[job].update(data)

    def release(self, job: int, index: int) -> None:
        """The claimed chunk ``index`` is hashed: advance, and hash successors that were deposited meanwhile."""
        with self._lock:
            self._next[job] = index + 1
        self._drain(job)

    def deposit(self, job: int, index: int, data: memoryview, hashed: threading.Event) -> None:
        """Chunk ``index`` was read without the turn: hash it now if it became next, else leave it to whoever
        advances the file to it. ``hashed`` is set once ``data`` need not be kept any longer."""
        with self._lock:
            if self._aborted:
                hashed.set()
                return
            if self._busy[job] or self._next[job] != index:
                self._pending[job][index] = (data, hashed)
                return
            self._busy[job] = True
            self._pending[job][index] = (data, hashed)
        self._drain(job)

    def _drain(self, job: int) -> None:
        """Hash deposited chunks while they are next in order (the caller holds the file's turn)."""
        while True:
            with self._lock:
                item = None if self._aborted else self._pending[job].pop(self._next[job], None)
                if item is None:
                    self._busy[job] = False
                    return
            data, hashed = item
            try:
                self._hashers[job].update(data)
            finally:
                hashed.set()
            with self._lock:
                self._next[job] += 1

    def abort(self) -> None:
        """A chunk failed: release every deposited chunk (the load is failing anyway)."""
        with self._lock:
            self._aborted = True
            for pending in self._pending:
                for _, hashed in pending.values():
                    hashed.set()
                pending.clear()

    def check(self) -> None:
        for job, h in zip(self._jobs, self._hashers):
            got = h.hexdigest()
            if got != job.xxh3_128:
                raise ShardLoadError(f"{job.path}: xxh3_128 digest mismatch: manifest says {job.xxh3_128}, "
                                     f"file content gives {got} (corrupted or modified shard; re-run vllm-gds shard)")
