"""Where a rank's parameters live while the sharder fills them: reused, page-aligned blocks under a byte budget.

vLLM allocates every parameter of a rank when the model is built (``torch.empty``: address space only). Filled
in place, every byte of the model becomes fresh memory, which the kernel zeroes page by page on first touch
(profiled on the 2-core box: ``clear_page_erms`` was a third of all CPU time of a TP=1 shard) and which stays
resident until the rank ends: peak RSS = the whole rank. Here, a parameter is moved into a block of this pool
just before the first ``load_weights`` call that writes into it, and its block goes back to the pool as soon
as its bytes are written and hashed (the touch plan says when a parameter is final, see touch_plan.py). Blocks
are kept by size and reused (a layer's parameters have the same sizes as the previous layer's), so memory is
faulted in about once per distinct size, and resident parameter memory stays within ``budget`` bytes: taking a
block waits for released ones while writes are in flight. Blocks are anonymous maps, so page-aligned: the O_DIRECT
writer sends them without a bounce copy.

Only parameters of at least ``MIN_BLOCK`` bytes move (small ones cost nothing to fault and keep the values vLLM
initialised them with, such as norm weights of ones or FP8 scale sentinels). A moved parameter keeps whatever vLLM
wrote into it at build time: its old memory is copied where it is resident (mincore); pages never touched hold
zeros, and a block taken for it is zeroed where it is not copied (a reused block holds an earlier parameter).
"""

from __future__ import annotations

import ctypes
import mmap
import re
import threading
import time
from collections.abc import Callable

import torch

from vllm_gds_plugin.loading.memory import huge_page_block

MIN_BLOCK = 1 << 20
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def _rounded(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE


def resident_ranges(t: torch.Tensor) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of ``t``'s memory whose pages are resident (were ever written, for anonymous
    memory; a large allocation's first page always is: the allocator's header lives there)."""
    start = t.data_ptr() // _PAGE * _PAGE
    length = t.data_ptr() + t.nbytes - start
    pages = -(-length // _PAGE)
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(start, length, vec) != 0:
        return [(0, t.nbytes)]  # cannot tell (not a mapping we may inspect): keep everything
    resident_pages = bytes(vec).translate(_RESIDENT_BIT)  # 1 per resident page, else 0
    ranges = []
    for run in re.finditer(b"\x01+", resident_pages):  # C-speed scan: a 1 GB parameter has 262144 pages
        lo = max(start + run.start() * _PAGE - t.data_ptr(), 0)
        ranges.append((lo, min(start + run.end() * _PAGE - t.data_ptr(), t.nbytes)))
    return ranges


_RESIDENT_BIT = bytes(b & 1 for b in range(256))  # mincore: bit 0 of each page's byte says resident


class BlockPool:
    """Page-aligned, zero-filled blocks by size, at most ``budget`` bytes of them handed out or kept (a single
    larger request is still served, alone)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._free: dict[int, list[torch.Tensor]] = {}
        self._held = 0  # bytes handed out or kept free
        self._in_use = 0
        self.peak_in_use = 0
        self.zeroing_s = 0.0  # spent zeroing reused blocks (reported by the sharder)
        self._cond = threading.Condition()

    def take(self, nbytes: int, may_wait: Callable[[], bool], zeroed: bool = True) -> torch.Tensor:
        """A uint8 block of ``nbytes`` (rounded up to pages; ``zeroed=False``: a reused one keeps old bytes, for
        a caller that overwrites all of it). While the budget is used up and ``may_wait()`` (blocks will come
        back: their writes are in flight), wait; else go over the budget rather than deadlock."""
        size = _rounded(nbytes)
        reused = False
        with self._cond:
            while True:
                if self._free.get(size):
                    block, reused = self._free[size].pop(), True
                    break
                while self._held + size > self.budget and self._drop_one_free():
                    pass
                if self._held + size <= self.budget or not may_wait():
                    block = huge_page_block(size)
                    self._held += size
                    break
                self._cond.wait(0.05)
            self._in_use += size
            self.peak_in_use = max(self.peak_in_use, self._in_use)
        if reused and zeroed:  # as zero as a fresh map: no earlier parameter's bytes can reach a file
            t = time.monotonic()
            block.zero_()
            self.zeroing_s += time.monotonic() - t
        return block[:nbytes]

    def give(self, block: torch.Tensor) -> None:
        whole = torch.empty(0, dtype=torch.uint8).set_(block.untyped_storage())
        with self._cond:
            self._in_use -= whole.numel()
            self._free.setdefault(whole.numel(), []).append(whole)
            self._cond.notify_all()

    def _drop_one_free(self) -> bool:
        for size, blocks in self._free.items():
            if blocks:
                blocks.pop()  # unmapped once the last view is gone
                self._held -= size
                return True
        return False

    def clear(self) -> None:
        with self._cond:
            self._free.clear()
            self._held = self._in_use


class MovedParams:
    """Moves parameters into pool blocks before they are filled and back out once written."""

    def __init__(self, pool: BlockPool, params: dict[str, torch.nn.Parameter], writer_ok: Callable[[], bool],
                 ) -> None:
        self._pool = pool
        self._params = params
        self._writer_ok = writer_ok
        self._blocks: dict[str, torch.Tensor] = {}
        self._writing: set[str] = set()  # moved parameters queued for writing, not yet released

    def _may_wait(self) -> bool:
        return bool(self._writing) and self._writer_ok()

    def move_in(self, names: list[str]) -> None:
        for name in names:
            p = self._params[name]
            if p.nbytes < MIN_BLOCK or name in self._blocks:
                continue
            block = self._pool.take(p.nbytes, self._may_wait)
            old = p.data.reshape(-1).view(torch.uint8)
            for lo, hi in resident_ranges(old):  # the rest was never written: zeros, like a fresh block
                block[lo:hi].copy_(old[lo:hi])
            new = block.view(p.dtype).view(p.shape)
            self._blocks[name] = block
            p.data = new

    def writing(self, name: str) -> None:
        if name in self._blocks:
            self._writing.add(name)

    def release(self, name: str) -> None:
        """``name`` is on disk and hashed and never loaded again: its block goes back to the pool (the parameter
        keeps an empty tensor)."""
        block = self._blocks.pop(name, None)
        if block is not None:
            p = self._params[name]
            p.data = torch.empty(0, dtype=p.dtype)
            self._writing.discard(name)
            self._pool.give(block)
