"""Verification of loaded tensors against the manifest's per-tensor checksums (format version 2), overlapped with
the load on GPUs.

A reader reports each tensor whose bytes have landed (:data:`~vllm_gds_plugin.loading.readers.base.Landed`: the
copies of the last chunk holding its bytes are done). On CUDA a thread of this module collects them and, for every
:data:`BATCH_BYTES` of landed tensors, launches the checksum kernel (kernels/checksum) over them on a stream of its
own, so the checks run while the remaining chunks are still read and copied; :meth:`TensorChecks.finish` checks
whatever was not launched yet (the tensors that landed last, or all of them for a reader that reports nothing) and
compares everything with one wait. Measured on the H100 (benchmarks/results/experiments/README.md): checking
everything after the load waits 24-28 ms for 9-16 GB (+11-15% load time); launching as tensors land, with each batch
built at its launch (~15 ms of wall time apiece beside 12 reader threads and the GIL), +15-17%. Launches now reuse
one table built at the start: 2-3 ms per flush on an H200 (experiments/verify_overhead-h200-*). Elsewhere (the CPU
platform) the plain-torch reference runs once, in :meth:`finish`: there the readers already use every core.
"""

from __future__ import annotations

import contextlib
import queue
import threading

import torch

from vllm_gds_plugin.kernels.checksum import ops as checksum_ops
from vllm_gds_plugin.loading.readers.base import FileJob, ShardLoadError

# Landed bytes per flush (one kernel launch per file range): enough to keep the launches few, small enough that
# the part left for after the load is short.
BATCH_BYTES = 512 << 20

Ids = list[tuple[int, int]]  # (job index, segment index)


class TensorChecks:
    """Checksums of the tensors of ``jobs`` as they land; :meth:`finish` raises on any mismatch. Call
    :meth:`close` in every case (it stops the launching thread; :meth:`finish` does too).

    ``eager`` (default: on CUDA) starts batches as tensors land; off, everything is checked in :meth:`finish`.
    A batch is, per file, the tensors from the last launched one up to the first that has not landed (files are
    read front to back, so each file's landed tensors are mostly such a prefix): one kernel launch per file
    range of a table built once (kernels/checksum ``plan_checksums``), the least Python a launch can cost beside
    the reader threads."""

    def __init__(self, jobs: list[FileJob], device: torch.device, batch_bytes: int = BATCH_BYTES,
                 eager: bool | None = None) -> None:
        self.jobs = jobs
        self.device = device
        self.batch_bytes = batch_bytes
        self.batches = 0  # flushes of landed tensors (kernel launches, one per file range) so far
        self._first = [0]  # index of each job's first segment in the plan's tensor list
        for job in jobs:
            self._first.append(self._first[-1] + len(job.segments))
        self._launched = [0] * len(jobs)  # per job: segments up to here are launched
        self._ready = [0] * len(jobs)  # per job: segments up to here have landed
        self._landed = [[False] * len(job.segments) for job in jobs]
        self._plan: checksum_ops.Planned | None = None
        self._queue: queue.SimpleQueue[Ids | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device=device)
        if eager is None:
            eager = device.type == "cuda"
        if eager:
            self._thread = threading.Thread(target=self._launch_as_they_land, name="gds-sharded-checksum",
                                            daemon=True)
            self._thread.start()

    def landed(self, ids: Ids) -> None:
        """A reader's report (any thread): these tensors' bytes are in place."""
        if self._thread is not None:
            self._queue.put(ids)

    def _planned(self) -> checksum_ops.Planned:
        if self._plan is None:
            self._plan = checksum_ops.plan_checksums([seg.dest for job in self.jobs for seg in job.segments])
        return self._plan

    def _launch_as_they_land(self) -> None:
        try:
            with self._on_stream():
                self._planned()  # built while the first chunks are read, not before
                nbytes = 0
                while (ids := self._queue.get()) is not None:
                    for j, k in ids:
                        self._landed[j][k] = True
                        segs, flags = self.jobs[j].segments, self._landed[j]
                        while self._ready[j] < len(flags) and flags[self._ready[j]]:
                            nbytes += segs[self._ready[j]].nbytes
                            self._ready[j] += 1
                    if nbytes >= self.batch_bytes:
                        self._launch(self._ready)
                        nbytes = 0
        except BaseException as e:  # noqa: BLE001 - re-raised by finish() on the loading thread
            self._error = e

    def _launch(self, upto: list[int]) -> None:
        """Launch every job's segments from the last launched one up to ``upto[j]``."""
        plan = self._planned()
        for j, end in enumerate(upto):
            if end > self._launched[j]:
                plan.launch(self._first[j] + self._launched[j], self._first[j] + end)
                self._launched[j] = end
        self.batches += 1

    def _on_stream(self) -> contextlib.AbstractContextManager[object]:
        """Launch on this object's stream (and device): the caller's stream is busy with the load's copies."""
        if self._stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """Check every tensor of the jobs (call once the reader returned: every byte is in place)."""
        self.close()
        if self._error is not None:
            raise self._error
        with self._on_stream():
            self._launch([len(job.segments) for job in self.jobs])
            if self._stream is not None:
                self._stream.synchronize()
            got = self._planned().result()
        segments = [(job, seg) for job in self.jobs for seg in job.segments]  # the plan's order
        bad = [f"{job.path}: tensor {seg.name!r}: checksum of the loaded bytes {g} != manifest {seg.checksum}"
               for (job, seg), g in zip(segments, got) if g != seg.checksum]
        if bad:
            raise ShardLoadError(f"verify: {len(bad)} tensor(s) differ from the manifest (file changed or corrupted "
                                 f"since vllm-gds shard wrote it): " + "; ".join(bad[:3]))
