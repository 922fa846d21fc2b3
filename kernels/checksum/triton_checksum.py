"""Checksums (``naive.py``) of many CUDA tensors, any number of them per kernel launch.

Work is split into units of ``UNIT_BLOCKS`` 4 KiB blocks (128 KiB); unit ``u`` belongs to tensor ``tensor_of[u]``
and reads that tensor's memory through its address (an int64 cast to a pointer), so one launch covers every
parameter of a model whatever their dtypes, or (:class:`ChecksumTable`) any range of them as their bytes land.
Each unit writes its partial A and B into two rows; a cumulative sum of each row then gives every tensor's pair.
Tensors whose size or address is not a multiple of 8 bytes (an FP8 checkpoint's per-tensor scales: 4-12 bytes
each) are copied, zero-padded to whole words, into one buffer once all are in place (the definition pads with
zeros, so the checksum is the same): through the plain-torch reference each cost two host synchronizations, and
they made verification of an 8B FP8 load take 16% longer on the H100 instead of 1%.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vllm_gds_plugin.kernels.checksum import naive

UNIT_BLOCKS = 32
_ROWS = 4  # blocks per step: 16 KiB of loads in flight per program
_UNIT_WORDS = UNIT_BLOCKS * naive.WORDS_PER_BLOCK


@triton.jit(do_not_specialize=["unit_base", "row_stride"])
def _unit_sums(tensor_of, addr, nwords, first_unit, mult, out, row_stride, unit_base,
               UNIT_BLOCKS: tl.constexpr, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """Partial (A, B) of unit ``unit_base + program_id`` into ``out[1 + u]`` and ``out[row_stride + 1 + u]``:
    ROWS blocks per step as a [ROWS, WORDS] tile, accumulated per lane (one reduction at the end, not one per
    block: a reduction synchronizes the whole program). ``unit_base`` and ``row_stride`` are not specialized
    on: every launch of every table reuses one compiled kernel."""
    u = unit_base + tl.program_id(0)
    t = tl.load(tensor_of + u)
    local = u - tl.load(first_unit + t)  # this unit's index inside its tensor
    start = local * (UNIT_BLOCKS * WORDS)
    left = tl.load(nwords + t) - start  # words of the tensor from this unit's start
    base = (tl.load(addr + t) + start * 8).to(tl.pointer_type(tl.int64))
    rows = tl.arange(0, ROWS)[:, None]
    idx = rows * WORDS + tl.arange(0, WORDS)[None, :]
    m = tl.load(mult + tl.arange(0, WORDS))[None, :]
    acc_a = tl.zeros((ROWS, WORDS), dtype=tl.int64)
    acc_b = tl.zeros((ROWS, WORDS), dtype=tl.int64)
    for k in range(0, UNIT_BLOCKS, ROWS):
        w = tl.load(base + k * WORDS + idx, mask=k * WORDS + idx < left, other=0)
        prod = w * m
        acc_a += prod
        acc_b += prod * (local * UNIT_BLOCKS + k + rows + 1)  # the block's 1-based index inside its tensor
    tl.store(out + 1 + u, tl.sum(tl.sum(acc_a, axis=1), axis=0))
    tl.store(out + row_stride + 1 + u, tl.sum(tl.sum(acc_b, axis=1), axis=0))


class ChecksumTable:
    """Checksums of a fixed list of CUDA tensors whose memory exists but whose bytes may still be arriving (a
    load's parameters): everything a launch needs is built here, once, so :meth:`launch` for a range of the
    tensors that are ready is one kernel launch on the current stream. Verification launches while 12 reader
    threads hold the GIL in turn, where every Python or torch call waits its turn: batches built per launch
    (a dozen torch calls each) took ~15 ms of wall time apiece on the H100 and slowed the readers
    (benchmarks/results/experiments/README.md). :meth:`result` (every tensor ready) waits once and gives them
    all; tensors whose size or address is not a multiple of 8 bytes are done there (:class:`_WordAligned`)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._raws = [naive.as_bytes(t) for t in tensors]
        n = len(self._raws)
        self._odd = [i for i, r in enumerate(self._raws) if r.numel() % 8 or r.data_ptr() % 8]
        odd = set(self._odd)
        words = [0 if i in odd else r.numel() // 8 for i, r in enumerate(self._raws)]
        units = [-(-w // _UNIT_WORDS) for w in words]
        first = [0]
        for k in units:
            first.append(first[-1] + k)
        self._first = first
        if not n:
            return
        device = self._raws[0].device
        # The table (addresses, word counts, unit counts, first units and the total) in one asynchronous copy
        # from pinned memory; each column starts 16-byte aligned (``m`` rows apart, m even): Triton compiles a
        # kernel per alignment of its pointer arguments.
        m = n + n % 2
        pad = [0] * (m - n)
        table = torch.tensor([r.data_ptr() for r in self._raws] + pad + words + pad + units + pad + first,
                             dtype=torch.int64, pin_memory=device.type == "cuda").to(device, non_blocking=True)
        self._addr, self._nwords, self._first_unit = table[:m], table[m:2 * m], table[3 * m:]
        total = first[-1]
        self._tensor_of = torch.repeat_interleave(torch.arange(n, device=device), table[2 * m:2 * m + n],
                                                  output_size=total)
        # Row 0 the units' A, row 1 their B; column u + 1 is unit u (column 0 stays 0 for the differences). Two
        # rows, not [units, 2]: torch's CUDA cumsum over dim 0 of an [N, 2] tensor is scan_outer_dim, one thread
        # per column walking all N rows in turn. For an 8B model's 122K units that fits the ~18 ms a checksum
        # pass took beyond its 3.8 ms kernel on an H200 (bench_load-20261206T222939Z; not yet re-timed); a row
        # alone is 1-D, which torch scans with CUB.
        self._sums = torch.zeros(2, total + 1, dtype=torch.int64, device=device)
        self._mult = _multipliers(device)
        self._odd_copies = _WordAligned([self._raws[i] for i in self._odd]) if self._odd else None

    def launch(self, lo: int, hi: int) -> None:
        """Checksum tensors ``lo`` .. ``hi - 1`` (their bytes are in place) on the current stream."""
        u0, u1 = self._first[lo], self._first[hi]
        if u1 > u0:
            _unit_sums[(u1 - u0,)](self._tensor_of, self._addr, self._nwords, self._first_unit, self._mult,
                                   self._sums, self._sums.stride(0), u0, UNIT_BLOCKS=UNIT_BLOCKS, ROWS=_ROWS,
                                   WORDS=naive.WORDS_PER_BLOCK, num_warps=4)

    def result(self) -> list[str]:
        """Every tensor's checksum (all launched ranges and every byte in place); one host synchronization."""
        if not self._raws:
            return []
        odd = self._odd_copies.copy() if self._odd_copies is not None else None
        # Each row as a 1-D tensor (CUB's scan); wraps modulo 2**64 like the sums themselves.
        cum = torch.stack([self._sums[0].cumsum(0), self._sums[1].cumsum(0)])
        pairs = (cum[:, self._first_unit[1:]] - cum[:, self._first_unit[:-1]]).T.tolist()
        if odd is not None:
            for i, got in zip(self._odd, odd.result()):
                pairs[i] = got
        return [p if isinstance(p, str) else naive.combine(*p) for p in pairs]


@functools.cache
def _multipliers(device: torch.device) -> torch.Tensor:
    """The per-word multipliers on ``device``, copied there once (not once per launch)."""
    return naive.multipliers(device)


class _WordAligned:
    """Zero-padded copies of whole words of ``raws`` (1-D uint8 views whose size or address is not a multiple of 8
    bytes), all made by one ``cat`` into one buffer, and their checksum table (the definition pads with zeros, so
    their checksums are the originals'). Everything but the copy is set up once, with the table that owns them,
    so the wait after a load holds one ``cat`` and one launch, not a new table of a few hundred tensors."""

    def __init__(self, raws: list[torch.Tensor]) -> None:
        zeros = torch.zeros(8, dtype=torch.uint8, device=raws[0].device)
        sizes = [-(-r.numel() // 8) * 8 for r in raws]
        self._pieces = [piece for r, size in zip(raws, sizes) for piece in (r, zeros[:size - r.numel()])]
        self._buf = torch.empty(sum(sizes), dtype=torch.uint8, device=raws[0].device)
        self._table = ChecksumTable(list(self._buf.split(sizes)))

    def copy(self) -> ChecksumTable:
        """Copy the bytes (every one in place by now) and launch their checksums; the table gives the results."""
        torch.cat(self._pieces, out=self._buf)
        self._table.launch(0, len(self._pieces) // 2)
        return self._table


def checksums(tensors: Sequence[torch.Tensor]) -> list[str]:
    """The checksum of every tensor (all on one CUDA device); one host synchronization."""
    table = ChecksumTable(tensors)
    table.launch(0, len(tensors))
    return table.result()
