"""When is a rank's parameter final, so its bytes can go to disk while the rest of the rank still loads?

The sharder feeds the source to vLLM's ``load_weights`` in batches (vLLM supports repeated calls: it is how
weights are updated in place) and each call reports the parameters it wrote into. A parameter written by
batch b and not by batch b+1 is taken as final and queued for writing. That is an inference from checkpoint
order, so it is checked, not trusted: a parameter touched again later is simply written again (the write queue
is FIFO, so the last write holds its final bytes and the part file is re-hashed). Writes are issued in file
layout order (large sequential writes), except that when more than ``out_of_order_bytes`` of final parameters
wait behind one that is not, they are written out of order rather than held in memory-bound limbo.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class WriteSchedule:
    def __init__(self, order: list[tuple[str, torch.Tensor]], submit: Callable[[str, torch.Tensor], None],
                 out_of_order_bytes: int = 1 << 30) -> None:
        self._order = order  # (name, tensor) in file layout order
        self._tensors = dict(order)
        self._position = {n: i for i, (n, _) in enumerate(order)}
        self._submit = submit
        self._limit = out_of_order_bytes
        self._next = 0  # order[:_next] were submitted in order
        self._ready: set[str] = set()  # final, not yet submitted
        self._submitted: set[str] = set()
        self._candidates: set[str] = set()  # touched by the last batch
        self.rewrites = 0

    def after_batch(self, touched: Iterable[str]) -> None:
        """The parameter names one ``load_weights`` call reported as loaded."""
        touched = {n for n in touched if n in self._tensors}
        self._mark_final(self._candidates - touched)
        for name in touched & self._submitted:  # written too early: it changes again, write it again later
            self._submitted.discard(name)
            self.rewrites += 1
        self._candidates = touched
        self._flush()

    def finish(self) -> None:
        """Loading is over: everything not yet written is final now."""
        self._mark_final(n for n, _ in self._order if n not in self._submitted)
        self._candidates = set()
        self._flush()

    def _mark_final(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._submitted:
                self._ready.add(name)

    def _write(self, name: str) -> None:
        self._ready.discard(name)
        self._submitted.add(name)
        self._submit(name, self._tensors[name])

    def _flush(self) -> None:
        for name in [n for n in self._ready if self._position[n] < self._next]:  # rewrites behind the cursor
            self._write(name)
        while self._next < len(self._order):
            name = self._order[self._next][0]
            if name in self._ready:
                self._write(name)
            elif name not in self._submitted:  # not final yet: later ones wait (or go out of order below)
                break
            self._next += 1
        if sum(self._tensors[n].nbytes for n in self._ready) > self._limit:
            for name in sorted(self._ready, key=self._position.__getitem__):
                self._write(name)
