"""Read-only shared mappings of shard files: the page cache's own pages, seen as one uint8 tensor per file.

Two users: :func:`resident_fraction` (mincore: is a file warm?) and the ``mapped`` source of the ring pipeline,
which copies out of the page cache without a staging copy (on GPUs after page-locking the window with
``cudaHostRegister``, so the copy engine reads the page cache directly).

A mapping is made with libc's mmap (MAP_SHARED, PROT_READ) rather than Python's :mod:`mmap`: the address is
needed for registration and mincore, and a read-only :mod:`mmap` object cannot back a tensor without a warning.
Touching a page past the end of a file truncated while mapped raises SIGBUS; files are checked unchanged before
and after the load, and the GPU path page-locks each window before touching it (a vanished page fails the
registration instead).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch

PAGE = mmap.PAGESIZE


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


class FileMapping:
    """``size`` bytes of an open file mapped read-only at ``addr`` (nothing mapped for an empty file)."""

    def __init__(self, fd: int, size: int, path: os.PathLike[str] | str) -> None:
        self.size = size
        self.addr = 0
        if size == 0:
            return
        addr = _libc().mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap failed: {os.strerror(err)}", str(path))
        self.addr = int(addr)

    def tensor(self) -> torch.Tensor:
        """The whole file as a flat uint8 tensor over the mapping (valid until :meth:`close`; never written)."""
        if self.size == 0:
            return torch.empty(0, dtype=torch.uint8)
        raw = (ctypes.c_uint8 * self.size).from_address(self.addr)
        return torch.from_numpy(np.ctypeslib.as_array(raw))

    def resident_pages(self, start: int = 0, npages: int | None = None) -> np.ndarray:
        """mincore: one byte per page from page ``start`` (``npages``, default to the end), bit 0 set when the
        page is in the page cache."""
        total = -(-self.size // PAGE)
        npages = total - start if npages is None else min(npages, total - start)
        vec = np.zeros(max(0, npages), dtype=np.uint8)
        if npages > 0 and _libc().mincore(self.addr + start * PAGE, npages * PAGE, vec.ctypes.data) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return vec

    def close(self) -> None:
        if self.addr:
            _libc().munmap(self.addr, self.size)
            self.addr = 0


# resident_fraction looks at this many evenly spaced windows of SAMPLE_PAGES pages per file: mincore over every
# page of a 16 GB rank costs ~0.15 s (measured: 19 ms per 2 GiB), a third of a warm load's target time; 64
# windows per file still cost 8 ms for 18 files on the H100 machine (2% of a warm 16 GB load).
SAMPLES, SAMPLE_PAGES = 16, 16


def resident_fraction(path: os.PathLike[str] | str) -> float:
    """Share of a file's pages in the page cache (sampled); warm files are read buffered (or mapped), cold ones
    direct."""
    fd = os.open(path, os.O_RDONLY)
    try:
        m = FileMapping(fd, os.fstat(fd).st_size, Path(path))
        try:
            if not m.size:
                return 1.0
            pages = -(-m.size // PAGE)
            starts = range(0, pages, max(SAMPLE_PAGES, pages // SAMPLES))
            seen = np.concatenate([m.resident_pages(s, SAMPLE_PAGES) for s in starts])
            return float((seen & 1).mean())
        finally:
            m.close()
    finally:
        os.close(fd)
