"""The sharder's parameter memory (param_memory.py): blocks are page-aligned (O_DIRECT without a bounce copy),
reused by size, kept within the budget by waiting for released blocks while writes are in flight (and never
deadlocking when none are), and a moved parameter keeps what vLLM initialised it with."""

from __future__ import annotations

import mmap
import threading
import time

import torch

from vllm_gds_plugin.loading.manifest import ALIGNMENT
from vllm_gds_plugin.loading.param_memory import MIN_BLOCK, BlockPool, MovedParams, resident_ranges

MIB = 1 << 20


def test_blocks_are_aligned_and_reused_by_size() -> None:
    pool = BlockPool(8 * MIB)
    a = pool.take(3 * MIB + 5, lambda: False)
    assert a.numel() == 3 * MIB + 5 and a.data_ptr() % ALIGNMENT == 0
    ptr = a.data_ptr()
    a.fill_(7)
    pool.give(a)
    b = pool.take(3 * MIB + 5, lambda: False)
    assert b.data_ptr() == ptr  # the same memory again: no fresh pages to fault in
    assert not b.any()  # zeroed: nothing of the earlier parameter
    assert pool.peak_in_use == 3 * MIB + ALIGNMENT


def test_budget_waits_for_a_release_while_writes_are_in_flight() -> None:
    pool = BlockPool(4 * MIB)
    held = pool.take(3 * MIB, lambda: False)
    threading.Timer(0.2, pool.give, (held,)).start()  # "the write of this block finishes"
    t0 = time.monotonic()
    pool.take(2 * MIB, lambda: True)
    assert time.monotonic() - t0 >= 0.15 and pool.peak_in_use == 3 * MIB


def test_budget_is_exceeded_rather_than_deadlock() -> None:
    pool = BlockPool(4 * MIB)
    pool.take(3 * MIB, lambda: False)
    pool.take(2 * MIB, lambda: False)  # nothing will come back: go over the budget
    assert pool.peak_in_use == 5 * MIB


def test_moved_parameter_keeps_initialised_values_and_is_released() -> None:
    ones = torch.nn.Parameter(torch.ones(MIN_BLOCK // 2, dtype=torch.bfloat16), requires_grad=False)  # written
    # a never-touched anonymous map (what a large torch.empty is, past the allocator's header page), of which
    # vLLM wrote one page in the middle
    fresh = torch.frombuffer(mmap.mmap(-1, 8 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=torch.uint8)
    part = torch.nn.Parameter(fresh, requires_grad=False)
    part.data[5 * 4096 + 7] = 9
    small = torch.nn.Parameter(torch.ones(16), requires_grad=False)
    assert resident_ranges(ones.data) == [(0, ones.nbytes)]
    assert resident_ranges(part.data) == [(5 * 4096, 6 * 4096)]
    pool = BlockPool(64 * MIB)
    stale = pool.take(8 * MIB, lambda: False)
    stale.fill_(3)
    pool.give(stale)  # the next 8 MiB block is this one, holding an earlier parameter's bytes
    moved = MovedParams(pool, {"ones": ones, "part": part, "small": small}, lambda: True)
    small_ptr = small.data_ptr()
    moved.move_in(["ones", "part", "small"])
    assert ones.data.data_ptr() % ALIGNMENT == 0 and torch.equal(ones.data, torch.ones_like(ones.data))
    assert part.data.data_ptr() % ALIGNMENT == 0 and part.shape == (8 * MIB,)
    assert part.data[5 * 4096 + 7] == 9 and int(part.data.count_nonzero()) == 1  # nothing stale, nothing lost
    assert small.data_ptr() == small_ptr  # below MIN_BLOCK: stays where vLLM put it
    moved.writing("part")
    moved.release("part")
    assert part.numel() == 0
    again = pool.take(8 * MIB, lambda: False)  # the released block serves the next parameter of that size
    assert again.numel() == 8 * MIB and pool.peak_in_use <= 9 * MIB + 2 * ALIGNMENT
