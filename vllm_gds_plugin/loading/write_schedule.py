"""In which order a rank's final parameters go to disk.

The sharder knows exactly when a parameter is final (touch_plan.py: the last source tensor that writes into it
was loaded). Final parameters are written in file layout order (large sequential writes), except that when more
than ``out_of_order_bytes`` of final parameters wait behind one that is not final yet, they are written out of
order rather than held in memory (the part file is then re-hashed at its end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class WriteSchedule:
    def __init__(self, order: list[tuple[str, int]], submit: Callable[[str], None],
                 out_of_order_bytes: int = 1 << 30) -> None:
        self._order = order  # (name, nbytes) in file layout order
        self._nbytes = dict(order)
        self._position = {n: i for i, (n, _) in enumerate(order)}
        self._submit = submit
        self._limit = out_of_order_bytes
        self._next = 0  # order[:_next] were submitted
        self._ready: set[str] = set()  # final, not yet submitted
        self._submitted: set[str] = set()

    def final(self, names: Iterable[str]) -> None:
        """These parameters are final: write them as soon as the layout order allows."""
        self._ready.update(n for n in names if n in self._nbytes and n not in self._submitted)
        self._flush()

    def finish(self) -> None:
        """Loading is over: everything not yet written is final now."""
        self.final(n for n, _ in self._order)

    def _write(self, name: str) -> None:
        self._ready.discard(name)
        self._submitted.add(name)
        self._submit(name)

    def _flush(self) -> None:
        while self._next < len(self._order):
            name = self._order[self._next][0]
            if name in self._ready:
                self._write(name)
            elif name not in self._submitted:  # not final yet: later ones wait (or go out of order below)
                break
            self._next += 1
        if sum(self._nbytes[n] for n in self._ready) > self._limit:
            for name in sorted(self._ready, key=self._position.__getitem__):
                self._write(name)
