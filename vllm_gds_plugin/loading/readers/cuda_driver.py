"""Host-to-device copies and their completion events through the CUDA driver API, called with ctypes.

Why not ``tensor.copy_(non_blocking=True)``: the pinned path's reader threads issue thousands of small copies,
and torch's copy holds the GIL through its dispatch, device guard and stream bookkeeping, so the readers queue
on the GIL behind each other's copy issue (measured on the H100: a quarter of the reader threads' time). A
ctypes call is a few attribute lookups. Waiting on a slot's event (``cuEventSynchronize``) releases the GIL.

The driver calls need the device's primary context (the one the CUDA runtime, hence torch, uses) current on
the calling thread; each reader thread makes it current once."""

from __future__ import annotations

import ctypes
import threading

import torch

from vllm_gds_plugin.loading.readers.base import ShardLoadError

_EVENT_BLOCKING_SYNC, _EVENT_DISABLE_TIMING = 0x1, 0x2
_libs: dict[bool, ctypes.CDLL] = {}


def _driver(keep_gil: bool = False) -> ctypes.CDLL:
    """libcuda with typed entry points. ``keep_gil``: through ``PyDLL``, whose calls keep the GIL; right for the
    short non-blocking calls (copy issue, event record/query), where giving the GIL up and taking it back from
    a dozen busy reader threads costs more than the call (measured on the H100: +1-3 GB/s)."""
    if keep_gil not in _libs:
        try:
            lib = (ctypes.PyDLL if keep_gil else ctypes.CDLL)("libcuda.so.1")
        except OSError as e:
            raise ShardLoadError(f"the pinned path needs the CUDA driver library libcuda.so.1: {e}") from e
        p, u64, size, i = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int
        for name, args in (("cuDeviceGet", [ctypes.POINTER(i), i]),
                           ("cuDevicePrimaryCtxRetain", [ctypes.POINTER(p), i]),
                           ("cuDevicePrimaryCtxRelease_v2", [i]),
                           ("cuCtxSetCurrent", [p]),
                           ("cuMemcpyHtoDAsync_v2", [u64, p, size, p]),
                           ("cuEventCreate", [ctypes.POINTER(p), ctypes.c_uint]),
                           ("cuEventRecord", [p, p]),
                           ("cuEventSynchronize", [p]),
                           ("cuEventQuery", [p]),
                           ("cuEventDestroy_v2", [p]),
                           ("cuGetErrorName", [i, ctypes.POINTER(ctypes.c_char_p)])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, i
        _libs[keep_gil] = lib
    return _libs[keep_gil]


class DriverCopies:
    """Copies onto given streams and one reusable completion event per slot, for one device."""

    def __init__(self, device: torch.device) -> None:
        self.lib = _driver()
        index = device.index if device.index is not None else torch.cuda.current_device()
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self.dev, self.ctx = dev, ctx
        self.events: dict[int, ctypes.c_void_p] = {}
        self._local = threading.local()
        fast = _driver(keep_gil=True)
        self._memcpy, self._record, self._query = fast.cuMemcpyHtoDAsync_v2, fast.cuEventRecord, fast.cuEventQuery

    def _check(self, err: int, what: str) -> None:
        if err:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(err, ctypes.byref(name))
            raise ShardLoadError(f"CUDA driver call {what} failed: {(name.value or b'?').decode()} ({err})")

    def _current(self) -> None:
        if not getattr(self._local, "ready", False):
            self._check(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
            self._local.ready = True

    def issue(self, slot: int, src: int, pieces: tuple[tuple[int, int, int], ...], stream: int) -> None:
        """Queue on ``stream`` a copy of ``n`` bytes from pinned host address ``src + off`` to device address
        ``dst`` for every ``(off, dst, n)``, then record ``slot``'s event behind them."""
        self._current()
        memcpy = self._memcpy
        for off, dst, n in pieces:
            if err := memcpy(dst, src + off, n, stream):
                self._check(err, "cuMemcpyHtoDAsync")
        ev = self.events.get(slot)
        if ev is None:
            ev = ctypes.c_void_p()
            self._check(self.lib.cuEventCreate(ctypes.byref(ev), _EVENT_BLOCKING_SYNC | _EVENT_DISABLE_TIMING),
                        "cuEventCreate")
            self.events[slot] = ev
        self._check(self._record(ev, stream), "cuEventRecord")

    def wait(self, slot: int) -> None:
        """Block (sleeping, GIL released) until ``slot``'s last recorded copies are done."""
        ev = self.events.get(slot)
        if ev is not None:
            self._current()
            if self._query(ev) == 0:  # done already: no GIL round trip
                return
            self._check(self.lib.cuEventSynchronize(ev), "cuEventSynchronize")

    def close(self) -> None:
        self._current()
        for ev in self.events.values():
            self.lib.cuEventDestroy_v2(ev)
        self.events.clear()
        self.lib.cuDevicePrimaryCtxRelease_v2(self.dev)
