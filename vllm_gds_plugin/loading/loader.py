"""``--load-format gds-sharded``: stream each rank's own pre-sharded bytes straight into its parameters.

Order of work for one rank (the vLLM glue is in :mod:`vllm_gds_plugin.compat.loader`):

1. :func:`validate` the manifest against the running config (architecture, config digest, tp/pp size,
   quantization, dtype) before the model is even built; every mismatch is listed in one
   :class:`ShardLoadError` naming both sides.
2. :func:`~vllm_gds_plugin.loading.shard_check.check_rank_files`: rank folder and files present with the
   manifest's sizes (a truncated file is refused here), each file's safetensors header agrees with the manifest
   (a hand-edited manifest or a file of another rank is refused here); each file's identity is recorded so a
   file changed while loading is refused. :func:`plan_rank` maps the files onto the model's parameter storage:
   every manifest tensor matches a parameter by name, shape and dtype, every parameter is covered. Still no
   byte of tensor data read.
3. :func:`load_rank` runs one reader (gds / pinned / host, :func:`pick_reader`) and returns a
   :class:`LoadReport` whose :meth:`LoadReport.log_line` is logged once per rank.
4. vLLM's ``process_weights_after_loading`` runs afterwards exactly as with the default loader.

:func:`load_rank` needs no vLLM engine (a manifest, a rank and a dict of destination tensors), which is what
``benchmarks/bench_load.py`` times.

Model-loader extra config (``--model-loader-extra-config '{"verify": true, ...}'``), all optional:

``verify`` (bool, false)
    Check every tensor's bytes, once loaded, against the manifest's checksum (format version 2): on GPUs a
    Triton kernel reads the parameters themselves, launched for each batch of tensors as they land while the
    rest still loads (:mod:`~vllm_gds_plugin.loading.tensor_checks`; every I/O path, GDS included), elsewhere
    the plain-torch reference after the read. Version 1 manifests have no checksums: their files' xxh3-128 are
    hashed from the staged chunks while the copies run (a host path, pinned on GPUs). A mismatch aborts the load
    (the engine never serves).
``threads`` (int, min(12, usable CPUs))
    Parallel readers (and cuFile worker threads on the gds path). On the H100 machine (16 CPUs) 12 fed the
    GPU fastest from the page cache; more readers fight over the GIL and host memory bandwidth.
``slots`` (int, 2)
    Staging buffers per reader thread: with 2 a thread reads its next chunk while the previous one's copies
    run; more let copies queue deeper behind slow reads (at the cost of pinned memory).
``chunk_mib`` (int, 4 from the page cache, 16 with O_DIRECT or xxh3 verification)
    Read/copy granularity (one staging buffer); see :data:`WARM_CHUNK_MIB` for why they differ.
``pinned_mib`` (int, 512)
    Bound on the staging ring (pinned host memory on GPUs, plain memory on CPU; with ``io="mapped"`` the
    page-cache bytes page-locked at once) per rank, at most 4096. The ring holds
    ``min(threads * slots, pinned_mib // chunk_mib)`` chunks (fewer threads run when fewer chunks fit); the
    defaults use 12 x 2 x 4 MiB = 96 MiB of it warm, 12 x 2 x 16 MiB = 384 MiB cold or verifying. The layout used is in the log line (``ring=``).
``streams`` (int, 4)
    CUDA streams the pinned path spreads its host-to-device copies over.
``io`` ("auto" | "direct" | "buffered" | "mapped", "auto")
    Host-path reads: O_DIRECT, through the page cache (``preadv`` into the ring), or ``mapped``: no staging
    copy, the copies read the page cache's own pages (page-locked with ``cudaHostRegister`` on GPUs, falling
    back to buffered with a note in the log line where the driver refuses). ``auto`` picks
    :data:`AUTO_WARM_IO` when most of the rank's bytes are already in the page cache (mincore) or the
    filesystem refuses O_DIRECT (tmpfs), direct otherwise.
``force_mode`` ("gds" | "pinned" | "host", unset)
    Skip the automatic choice (GDS when cuFile + nvidia-fs are usable and verification needs no staged bytes,
    else pinned on CUDA, host on CPU); for testing the fallbacks.

Extra device memory during the load is zero on every path: bytes land directly in the parameters (cuFile's
own bounce buffers, sized by cufile.json, are the only exception on the gds path).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from vllm_gds_plugin.loading.manifest import Manifest, rank_key
from vllm_gds_plugin.loading.memory import no_gc
from vllm_gds_plugin.loading.readers.base import FileJob, Reader, ReadResult, Segment, ShardLoadError, as_bytes
from vllm_gds_plugin.loading.readers.ring import IO_MODES, RingOptions
from vllm_gds_plugin.loading.shard_check import CheckedFile, check_rank_files
from vllm_gds_plugin.loading.tensor_checks import TensorChecks
from vllm_gds_plugin.loading.upcast import Upcast

__all__ = ["LoadOptions", "LoadReport", "RunningConfig", "ShardLoadError", "load_rank", "model_destinations",
           "pick_reader", "plan_rank", "validate"]

# A child of vLLM's "vllm" logger, so the per-rank line appears in vLLM's own log format and handlers.
log = logging.getLogger("vllm.gds_sharded")

MAX_PINNED_MIB = 4096  # an explicit choice may exceed the 512 MiB default (benchmarks sweep deeper rings)
# What io="auto" uses for warm files (page cache / tmpfs): "buffered" (preadv into the pinned ring) or "mapped"
# (zero-copy from the page cache). Chosen from benchmarks/bench_load.py's side-by-side rows on the H100.
AUTO_WARM_IO = "buffered"
FORCE_MODES = ("gds", "pinned", "host")
# Default read chunks. Page-cache reads: small enough that the staged chunk is still in the CPU's last-level
# cache when the copy engine reads it (H100 machine, 16 GB warm: 4 MiB ~40 GB/s, 16 MiB ~24 GB/s). O_DIRECT
# reads are DMA'd by the disk, never through the CPU's cache: there larger requests suit disks and Lustre.
# Verification too: a chunk waits in its slot until its file's hash reaches it, and with 4 MiB chunks the
# ring's slots ran out behind those waits (H100: verify on took 2.5x as long as off, 1.2x with 16 MiB).
WARM_CHUNK_MIB, BULK_CHUNK_MIB = 4, 16


@dataclass(frozen=True)
class LoadOptions:
    verify: bool = False
    pinned_mib: int = 512
    chunk_mib: int | None = None  # None: WARM_CHUNK_MIB, or BULK_CHUNK_MIB for O_DIRECT reads and verification
    threads: int = field(default_factory=lambda: min(12, len(os.sched_getaffinity(0))))
    slots: int = 2
    streams: int = 4
    io: str = "auto"
    force_mode: str | None = None

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> LoadOptions:
        """Strictly parse ``model_loader_extra_config`` (unknown keys and wrong types are errors)."""
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ShardLoadError(f"model_loader_extra_config: unknown key(s) {unknown} for load format "
                                 f"gds-sharded; known: {sorted(known)}")
        for key, value in extra.items():
            want: type = bool if key == "verify" else str if key in ("io", "force_mode") else int
            if type(value) is not want:  # bool is an int subclass: compare exact types
                raise ShardLoadError(f"model_loader_extra_config: {key}={value!r} must be a {want.__name__}")
        opts = cls(**extra)
        for key in ("pinned_mib", "chunk_mib", "threads", "slots", "streams"):
            if (value := getattr(opts, key)) is not None and value < 1:
                raise ShardLoadError(f"model_loader_extra_config: {key} must be >= 1")
        if opts.pinned_mib > MAX_PINNED_MIB:
            raise ShardLoadError(f"model_loader_extra_config: pinned_mib={opts.pinned_mib} exceeds the "
                                 f"{MAX_PINNED_MIB} MiB per-rank bound")
        if opts.io not in IO_MODES:
            raise ShardLoadError(f"model_loader_extra_config: io={opts.io!r} is not one of {list(IO_MODES)}")
        if opts.force_mode is not None and opts.force_mode not in FORCE_MODES:
            raise ShardLoadError(f"model_loader_extra_config: force_mode={opts.force_mode!r} is not one of "
                                 f"{list(FORCE_MODES)}")
        return opts

    def ring(self) -> RingOptions:
        warm, bulk = ((self.chunk_mib or WARM_CHUNK_MIB) << 20, (self.chunk_mib or BULK_CHUNK_MIB) << 20)
        return RingOptions(warm, max(warm, bulk, self.pinned_mib << 20), self.threads, self.io, AUTO_WARM_IO,
                           self.slots, bulk)


@dataclass(frozen=True)
class RunningConfig:
    """What the engine is about to build, in the manifest's vocabulary."""

    architectures: tuple[str, ...]
    config_digest: str  # manifest.config_digest() of the model folder's config.json
    tensor_parallel_size: int
    pipeline_parallel_size: int
    quantization: str  # vLLM's quantization method name, "none" when unquantized
    dtype: str  # torch dtype name without "torch."


def validate(manifest: Manifest, running: RunningConfig) -> None:
    """Refuse a manifest that does not describe the model the engine is building (before any read)."""
    m = manifest
    wrong: list[str] = []
    if m.model.architecture not in running.architectures:
        wrong.append(f"architecture: manifest {m.model.architecture!r}, running {list(running.architectures)}")
    if m.model.config_digest != running.config_digest:
        wrong.append(f"config digest: manifest {m.model.config_digest[:16]}..., running config.json "
                     f"{running.config_digest[:16]}... (manifest from another model or an edited config)")
    if m.parallel.tensor_parallel_size != running.tensor_parallel_size:
        wrong.append(f"tensor parallel size: manifest {m.parallel.tensor_parallel_size}, running "
                     f"{running.tensor_parallel_size} (re-shard with --tensor-parallel-size "
                     f"{running.tensor_parallel_size})")
    if m.parallel.pipeline_parallel_size != running.pipeline_parallel_size:
        wrong.append(f"pipeline parallel size: manifest {m.parallel.pipeline_parallel_size}, running "
                     f"{running.pipeline_parallel_size}")
    if m.quantization.method != running.quantization:
        wrong.append(f"quantization: manifest {m.quantization.method!r}, running {running.quantization!r}")
    if m.model.dtype != running.dtype:
        wrong.append(f"dtype: manifest {m.model.dtype!r}, running {running.dtype!r}")
    if wrong:
        raise ShardLoadError(f"{m.origin}: gds-sharded checkpoint does not match the running config: "
                             + "; ".join(wrong))


def model_destinations(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(every name a shard tensor may target -> its tensor, the parameters that must be filled).

    Tied parameters appear under all their names; "must be filled" is judged per storage so a manifest may
    name either alias."""
    dest: dict[str, torch.Tensor] = {n: p.data for n, p in model.named_parameters(remove_duplicate=False)}
    dest.update({n: b for n, b in model.named_buffers(remove_duplicate=False) if n not in dest})
    required = [n for n, p in model.named_parameters() if p.numel() > 0]
    return dest, required


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def plan_rank(manifest: Manifest, root: Path, pp: int, tp: int, dest: Mapping[str, torch.Tensor],
              required: list[str] | None = None, checked: list[CheckedFile] | None = None) -> list[FileJob]:
    """Check this rank's files and tensors against the model and map them onto ``dest`` (no data read).

    ``checked``: the result of :func:`~vllm_gds_plugin.loading.shard_check.check_rank_files` when the caller
    already ran it (files present, sizes, headers agree with the manifest)."""
    key = rank_key(pp, tp)
    if checked is None:
        checked = check_rank_files(manifest, root, pp, tp)
    jobs: list[FileJob] = []
    filled: set[int] = set()
    for c in checked:
        path, f = c.path, c.entry
        segs: list[Segment] = []
        for t in sorted(f.tensors, key=lambda t: t.offset):
            target = dest.get(t.name)
            if target is None:
                raise ShardLoadError(f"{path}: tensor {t.name!r} has no parameter of that name in the running "
                                     f"model (rank {key})")
            if tuple(target.shape) != t.shape or target.dtype != _torch_dtype(t.dtype):
                raise ShardLoadError(f"{path}: tensor {t.name!r}: manifest {t.dtype}{list(t.shape)}, running "
                                     f"model {str(target.dtype).removeprefix('torch.')}{list(target.shape)}")
            segs.append(Segment(t.name, t.offset, as_bytes(target), t.checksum))
            filled.add(target.data_ptr())
        jobs.append(FileJob(path, f.size, tuple(segs), f.xxh3_128, c.identity))
    missing = [n for n in (required or []) if dest[n].data_ptr() not in filled]
    if missing:
        raise ShardLoadError(f"{manifest.origin}: rank {key} has no data for {len(missing)} parameter(s) of the "
                             f"running model, e.g. {missing[:5]}")
    return jobs


def pick_reader(device: torch.device, opts: LoadOptions, hash_files: bool = False, file_bytes: int = 0) -> Reader:
    """The I/O path for ``device``: gds when usable (and no file hashing asked), else pinned on CUDA, host on
    CPU. ``hash_files``: verification hashes the staged bytes (a version 1 manifest). ``file_bytes``: what it
    will read, so the pinned path can allocate its staging ring ahead (close the reader in every case)."""
    from vllm_gds_plugin.loading.readers import gds

    mode = opts.force_mode
    if mode is None:
        if device.type == "cuda":
            reason = "verify needs staged bytes" if hash_files else gds.gds_unavailable_reason(device)
            mode = "gds" if reason is None else "pinned"
            if reason is not None:
                log.debug("gds-sharded: not using GPUDirect Storage: %s", reason)
        else:
            mode = "host"
    if mode in ("gds", "pinned") and device.type != "cuda":
        raise ShardLoadError(f"force_mode={mode!r} needs CUDA parameters; this model lives on {device}")
    if mode == "gds":
        if opts.force_mode == "gds" and (reason := gds.gds_unavailable_reason(device)) is not None:
            raise ShardLoadError(f"force_mode='gds' but GPUDirect Storage is unusable: {reason}")
        return gds.GdsReader(device, opts.threads)
    if mode == "pinned":
        from vllm_gds_plugin.loading.readers.pinned import PinnedReader

        return PinnedReader(opts.ring(), device, opts.streams, file_bytes)
    from vllm_gds_plugin.loading.readers.host import HostReader

    return HostReader(opts.ring())


def _read_checked(reader: Reader, jobs: list[FileJob], device: torch.device) -> ReadResult:
    """Read with every tensor checked against its manifest checksum as it lands (tensor_checks.py)."""
    checks = TensorChecks(jobs, device)
    try:
        result = reader.read(jobs, False, checks.landed)
        t0 = time.perf_counter()
        checks.finish()
    finally:
        checks.close()
    # what verification added after the read; the batches checked while it ran cost no wait
    return replace(result, verified=True, detail={
        **result.detail, "checksum_s": round(time.perf_counter() - t0, 4), "checksum_batches": checks.batches})


@dataclass(frozen=True)
class LoadReport:
    rank: str
    mode: str
    files: int
    bytes_read: int
    seconds: float
    verified: bool
    note: str = ""
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def log_line(self) -> str:
        d = self.detail
        ring = (f" ring={d['threads']:g}x{d['slots_per_thread']:g}x{d['chunk_mib']:g}MiB"
                if "ring_mib" in d else "")  # threads x slots per thread x chunk actually used
        return (f"gds-sharded rank {self.rank}: mode={self.mode} files={self.files} bytes={self.bytes_read} "
                f"seconds={self.seconds:.3f} GB/s={self.gb_per_s:.2f} verify={'on' if self.verified else 'off'}"
                + ring + (f" note={self.note!r}" if self.note else ""))


def load_rank(manifest: Manifest, pp: int, tp: int, dest: Mapping[str, torch.Tensor], opts: LoadOptions,
              required: list[str] | None = None, upcast: Upcast | None = None) -> LoadReport:
    """Fill ``dest`` (parameter name -> tensor, all on one device) with rank (pp, tp)'s bytes; log one line.

    With ``upcast`` (FP8 shards into an unquantized model, :mod:`~vllm_gds_plugin.loading.upcast`) the FP8
    weights and scales are read into its staging tensors and dequantized into ``dest`` afterwards."""
    if manifest.origin is None:
        raise ShardLoadError("manifest has no origin folder; load it with Manifest.load(OUT)")
    devices = {t.device for t in dest.values()}
    if len(devices) != 1:
        raise ShardLoadError(f"destination tensors span devices {sorted(map(str, devices))}; expected one")
    start = time.perf_counter()
    root = manifest.origin.parent
    with no_gc():  # a collection here would walk all of vLLM's objects in the middle of the load
        files = manifest.rank(pp, tp).files
        check_loaded = opts.verify and all(t.checksum is not None for f in files for t in f.tensors)
        hash_files = opts.verify and not check_loaded
        device = devices.pop()
        # Made first: the pinned path allocates its staging ring while the files are checked and planned.
        reader = pick_reader(device, opts, hash_files, sum(f.size for f in files))
        try:
            # Sizes and headers first: nothing is allocated from manifest shapes before the files on disk back
            # them.
            checked = check_rank_files(manifest, root, pp, tp)
            targets, must_fill = dict(dest), list(required or [])
            if upcast is not None:
                targets.update(upcast.allocate())
                must_fill = [n for n in must_fill if n not in set(upcast.weights)]
            jobs = plan_rank(manifest, root, pp, tp, targets, must_fill, checked)
            result = _read_checked(reader, jobs, device) if check_loaded else reader.read(jobs, hash_files)
        finally:
            reader.close()
    report = LoadReport(rank_key(pp, tp), result.mode, len(jobs), result.bytes_read,
                        time.perf_counter() - start, result.verified, result.note, result.detail)
    log.info(report.log_line())
    if upcast is not None:
        upcast.finish(dest)  # after the line: its GB/s is the I/O path's, not the CPU dequantization's
    return report
