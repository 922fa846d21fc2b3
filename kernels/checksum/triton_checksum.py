"""Checksums (``naive.py``) of many CUDA tensors in one kernel launch.

Work is split into units of ``UNIT_BLOCKS`` 4 KiB blocks (128 KiB); unit ``u`` belongs to tensor ``tensor_of[u]``
and reads that tensor's memory through its address (an int64 cast to a pointer), so one launch covers every
parameter of a model whatever their dtypes. Each unit writes its partial (A, B); a cumulative sum then gives
every tensor's pair. Tensors whose size or address is not a multiple of 8 bytes (an FP8 checkpoint's per-tensor
scales: 4-12 bytes each) are first copied, zero-padded to whole words, into one buffer (the definition pads with
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


@triton.jit
def _unit_sums(tensor_of, addr, nwords, first_unit, mult, out,
               UNIT_BLOCKS: tl.constexpr, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """Partial (A, B) of one unit: ROWS blocks per step as a [ROWS, WORDS] tile, accumulated per lane (one
    reduction at the end, not one per block: a reduction synchronizes the whole program)."""
    u = tl.program_id(0)
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
    tl.store(out + 2 * u, tl.sum(tl.sum(acc_a, axis=1), axis=0))
    tl.store(out + 2 * u + 1, tl.sum(tl.sum(acc_b, axis=1), axis=0))


class PendingChecksums:
    """Checksums launched on the current stream; :meth:`result` waits for them (one host synchronization)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        raws = _word_aligned([naive.as_bytes(t) for t in tensors])
        self._pairs: torch.Tensor | None = None
        if not raws:
            return
        device = raws[0].device
        words = [r.numel() // 8 for r in raws]
        units = [-(-w // _UNIT_WORDS) for w in words]
        first = [0]
        for n in units:
            first.append(first[-1] + n)
        total, n = first[-1], len(raws)
        # The per-tensor table (addresses, word counts, unit counts, first units and the total) in one
        # host->device copy from pinned memory, which is asynchronous: a copy from pageable memory blocks the
        # launching thread until the copy engine, busy with the load's own copies, gets to it. (Not what made
        # verification cost 11-17% of an H100 load: the same run with the pageable copies was within noise,
        # benchmarks/results/experiments/README.md.) Each column starts 16-byte aligned (``m`` rows apart, m even):
        # Triton compiles a kernel per alignment of its pointer arguments, and an odd tensor count would put every
        # other column off 16 bytes, a second compilation (0.6-0.9 s on the H100) in the middle of a load.
        m = n + n % 2
        pad = [0] * (m - n)
        table = torch.tensor([r.data_ptr() for r in raws] + pad + words + pad + units + pad + first, dtype=torch.int64,
                             pin_memory=device.type == "cuda").to(device, non_blocking=True)
        addr, nwords, nunits, first_unit = table[:n], table[m:m + n], table[2 * m:2 * m + n], table[3 * m:]
        pairs = torch.empty(total + 1, 2, dtype=torch.int64, device=device)
        pairs[0] = 0
        if total:
            tensor_of = torch.repeat_interleave(torch.arange(n, device=device), nunits, output_size=total)
            _unit_sums[(total,)](tensor_of, addr, nwords, first_unit, _multipliers(device), pairs[1:],
                                 UNIT_BLOCKS=UNIT_BLOCKS, ROWS=_ROWS, WORDS=naive.WORDS_PER_BLOCK, num_warps=4)
        cum = pairs.cumsum(0)  # wraps modulo 2**64 like the sums themselves
        self._pairs = cum[first_unit[1:]] - cum[first_unit[:-1]]  # per tensor, still on the device
        self._keep = raws  # the padded copies live until the kernel has read them

    def result(self) -> list[str]:
        return [] if self._pairs is None else [naive.combine(a, b) for a, b in self._pairs.tolist()]


@functools.cache
def _multipliers(device: torch.device) -> torch.Tensor:
    """The per-word multipliers on ``device``, copied there once (not once per launch)."""
    return naive.multipliers(device)


def _word_aligned(raws: list[torch.Tensor]) -> list[torch.Tensor]:
    """``raws`` with every tensor whose size or address is not a multiple of 8 replaced by a zero-padded copy of
    whole words, all copies made by one ``cat`` into one buffer."""
    odd = [i for i, r in enumerate(raws) if r.numel() % 8 or r.data_ptr() % 8]
    if not odd:
        return raws
    zeros = torch.zeros(8, dtype=torch.uint8, device=raws[0].device)
    sizes = [-(-raws[i].numel() // 8) * 8 for i in odd]
    buf = torch.cat([piece for i, size in zip(odd, sizes) for piece in (raws[i], zeros[:size - raws[i].numel()])])
    out = list(raws)
    offset = 0
    for i, size in zip(odd, sizes):
        out[i] = buf[offset:offset + size]
        offset += size
    return out


def checksums(tensors: Sequence[torch.Tensor]) -> list[str]:
    """The checksum of every tensor (all on one CUDA device); one host synchronization."""
    return PendingChecksums(tensors).result()
