"""What every read path shares: the plan it executes, the result it reports, its error type.

A :class:`FileJob` lists, for one shard file, which byte ranges go into which destination tensor (a flat
``uint8`` view of a parameter's own storage, on whatever device the parameter lives). A reader moves those bytes
and, when asked, checks the file's xxh3-128 digest. Readers never allocate destination memory and never stage a
whole file: that is what keeps extra device memory at zero and host memory bounded.
"""

from __future__ import annotations

import os
import threading
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


class Reader(Protocol):
    """One I/O path. ``read`` fills every segment of every job or raises :class:`ShardLoadError`."""

    def read(self, jobs: list[FileJob], verify: bool) -> ReadResult: ...


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of a contiguous tensor's storage (no copy), the form readers write into."""
    if not t.is_contiguous():
        raise ShardLoadError("destination tensor is not contiguous; cannot write shard bytes into it in place")
    return t.detach().reshape(-1).view(torch.uint8)


def open_file(path: Path, direct: bool) -> int:
    """Open a shard for reading, with O_DIRECT when asked (raises OSError where the filesystem refuses it)."""
    return os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))


class OrderedDigests:
    """Per-file xxh3-128 fed from several threads; chunk ``k`` of a file is hashed only after chunk ``k-1``.

    The manifest holds one digest per whole file, so hashing is sequential within a file, but chunks of
    different files hash in parallel (xxhash releases the GIL), which is why readers interleave files.
    """

    def __init__(self, jobs: list[FileJob]) -> None:
        self._jobs = jobs
        self._hashers = [xxhash.xxh3_128() for _ in jobs]
        self._next = [0] * len(jobs)
        self._aborted = False
        self._turn = threading.Condition()

    def feed(self, job: int, index: int, data: memoryview) -> None:
        with self._turn:
            self._turn.wait_for(lambda: self._aborted or self._next[job] == index)
            if self._aborted:
                return
        self._hashers[job].update(data)  # outside the lock: other files hash concurrently
        with self._turn:
            self._next[job] += 1
            self._turn.notify_all()

    def abort(self) -> None:
        """A chunk failed: release every thread waiting for its turn (the load is failing anyway)."""
        with self._turn:
            self._aborted = True
            self._turn.notify_all()

    def check(self) -> None:
        for job, h in zip(self._jobs, self._hashers):
            got = h.hexdigest()
            if got != job.xxh3_128:
                raise ShardLoadError(f"{job.path}: xxh3_128 digest mismatch: manifest says {job.xxh3_128}, "
                                     f"file content gives {got} (corrupted or modified shard; re-run vllm-gds shard)")
