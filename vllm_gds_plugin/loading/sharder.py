"""``vllm-gds shard``: HF checkpoint -> (FP8) -> one folder of aligned safetensors per (pp, tp) rank + manifest.

Every rank's bytes come from vLLM itself: the sharder builds vLLM's model class as that rank (see
compat/model_build.py), feeds the (FP8-quantized) source tensors through the model's own ``load_weights``, and
saves ``named_parameters()`` as they are then, i.e. before ``process_weights_after_loading``. No per-architecture
slicing rules live here.

Throughput and memory (profiled on the 2-core box: first-touch zeroing of fresh memory, the read copies, buffered
writes of a scratch FP8 checkpoint, re-reading out-of-order files to hash them, and garbage collection
dominated): all ranks of a run (of a ``--jobs`` worker) are made in ONE pass over the source. Each batch of source
tensors is read into reused buffers (source.py), its linear weights FP8-quantized once into reused blocks, and
the batch fed to every rank's vLLM model in turn. Which parameters a
source tensor writes into is learned beforehand from vLLM on the meta device (touch_plan.py), so each parameter
is given memory from a pool of reused, page-aligned blocks just before it is first written, and goes to disk
(O_DIRECT from that memory, ``--write-threads`` writes in flight; the file's xxh3 and the tensor checksums each
on a thread of its own) the moment it is final, after which its block is reused (param_memory.py). Part files are
laid out in the order parameters become final, so each is written front to back. Peak RSS is therefore

    RSS <= base + (2.5 + PARAM_BUDGET_BATCHES) x B,   B = bytes of the largest read batch
                                                       = max(largest source tensor, ~BATCH_BYTES)

per process, whatever the model size, TP size or number of ranks: ``base`` is the process with vLLM imported
and the ranks' models built (address space only, plus parameters under param_memory.MIN_BLOCK), 2 x B the
read buffers (the batch being loaded and the next one), B/2 a batch's fp8 weights when quantizing,
PARAM_BUDGET_BATCHES x B the parameter blocks (loading waits for writes to return blocks beyond that). For
Llama-3.1-8B, B is the 1.05 GB embedding: about base + 4.7 GB at TP=1 as at TP=8, where a whole rank was 16 GB.
The source's sha256 runs on background threads meanwhile. ``--jobs J`` splits the ranks over J processes,
each making its share in one pass (J x the memory and the source reads, J x the cores).

Crash safety: everything is written into ``OUT.tmp-<pid>`` and renamed to ``OUT`` after the manifest (written
last) is on disk; any failure or Ctrl-C removes the temporary folder, so OUT is either absent/untouched or
complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import xxhash

from vllm_gds_plugin import __version__
from vllm_gds_plugin.kernels.checksum import naive as tensor_checksum
from vllm_gds_plugin.loading.fp8 import (
    FP8_DTYPE, FP8Error, FP8Scheme, linear_weight_selector, quantize_stream, quantized_specs,
)
from vllm_gds_plugin.loading.lustre import Striping
from vllm_gds_plugin.loading.manifest import (
    CreatedBy, FileEntry, Manifest, ManifestError, ModelInfo, Parallel, Quantization, RankEntry, Source,
    config_digest, fsync_dir, rank_dir, rank_key,
)
from vllm_gds_plugin.loading.memory import no_gc
from vllm_gds_plugin.loading.param_memory import BlockPool, MovedParams
from vllm_gds_plugin.loading.progress import Progress
from vllm_gds_plugin.loading.source import (
    ShardError, SourceCheckpoint, is_side_file, release_read_buffers, sha256_file,
)
from vllm_gds_plugin.loading.touch_plan import TouchPlan
from vllm_gds_plugin.loading.write_schedule import WriteSchedule
from vllm_gds_plugin.loading.writer import (
    PATH_METADATA_KEY, WRITE_THREADS, Layout, PartFile, WriteQueue, spec_of, split_specs,
)

log = logging.getLogger(__name__)

# 1 GiB parts: an 8B model's rank still has few files, and the loader's verify-while-loading hashes the files of
# a rank on parallel threads, which only keeps up with the reads when a rank has several parts (see README).
DEFAULT_MAX_FILE_SIZE = 1 << 30
# Source bytes per load_weights call: small enough that writing starts early, large enough to hold a layer.
BATCH_BYTES = 256 << 20
# Parameter memory budget in largest batches: one batch being loaded while the previous one is written.
PARAM_BUDGET_BATCHES = 2
# torch intra-op threads of a shard process at most (memory-bound copies and quantization gain little beyond).
MAX_TORCH_THREADS = 8


@dataclass(frozen=True)
class ShardOptions:
    src: Path
    out: Path
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str = "fp8"  # "fp8" | "none"
    fp8_scheme: str = "per-tensor"
    fp8_block_size: tuple[int, int] = (128, 128)
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    striping: Striping = field(default_factory=Striping)
    jobs: int = 1
    write_threads: int = WRITE_THREADS  # pwrite calls in flight per process
    overwrite: bool = False
    progress: bool | None = None  # None: on a TTY only


@dataclass(frozen=True)
class _Plan:
    """What every rank job needs (picklable, for --jobs worker processes)."""
    src: Path
    staging: Path  # OUT.tmp-<pid>, holding config.json already
    tp: int
    pp: int
    dtype: str
    quantize: FP8Scheme | None  # quantize the source on the fly with this scheme (None: feed as is)
    max_file_size: int
    striping: Striping
    torch_threads: int  # intra-op threads per process (see _setting)
    write_threads: int


def shard(opts: ShardOptions) -> Manifest:
    """Run the sharder; return the manifest of the complete OUT folder. Raises ShardError on bad input."""
    src = SourceCheckpoint.open(opts.src)
    tp, pp = opts.tensor_parallel_size, opts.pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise ShardError(f"--tensor-parallel-size and --pipeline-parallel-size must be >= 1 (got {tp}, {pp})")
    if opts.jobs < 1 or opts.write_threads < 1:
        raise ShardError(f"--jobs and --write-threads must be >= 1 (got {opts.jobs}, {opts.write_threads})")
    out_config, quant, feed_scheme = _output_config(src, opts)
    out = Path(opts.out).absolute()
    _check_out(out, opts.overwrite)

    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fingerprint = src.fingerprint()  # sha256 of the source on background threads while ranks are made
    try:
        for p in src.side_files():
            shutil.copy2(p, staging / p.name)
        (staging / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
        threads = max(1, min(MAX_TORCH_THREADS, (os.cpu_count() or 1) // min(opts.jobs, tp * pp)))
        plan = _Plan(src.root, staging, tp, pp, src.dtype, feed_scheme, opts.max_file_size, opts.striping, threads,
                     opts.write_threads)
        ranks = _run_ranks(plan, src, opts)
        manifest = Manifest(
            created_by=_created_by(), source=Source(str(src.root.absolute()), fingerprint.result()),
            model=ModelInfo(src.architecture, config_digest(src.config), src.dtype),
            parallel=Parallel(tp, pp), quantization=quant, ranks=ranks)
        manifest.save(staging)
        _publish(staging, out)
    except OSError as e:
        fingerprint.cancel()
        shutil.rmtree(staging, ignore_errors=True)
        what = "disk full" if e.errno == errno.ENOSPC else "write failed"
        raise ShardError(f"{out}: {what} ({e}); nothing was left behind") from e
    except BaseException:  # ShardError, Ctrl-C, vLLM errors: never leave a half-written folder
        fingerprint.cancel()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        release_read_buffers()
    return Manifest.load(out)


def _output_config(src: SourceCheckpoint, opts: ShardOptions) -> tuple[dict, Quantization, FP8Scheme | None]:
    """OUT/config.json, the manifest's quantization record, and the scheme to quantize the source with."""
    cfg = dict(src.config)
    src_qc = cfg.get("quantization_config")
    try:
        if opts.quantization == "none":
            if src_qc:
                raise ShardError(f"{src.root / 'config.json'}: source is already quantized "
                                 f"({src_qc.get('quant_method')}); --quantization none cannot undo that")
            quant, feed = Quantization("none", None), None
        elif opts.quantization == "fp8":
            if src_qc:  # already FP8: vLLM's loader takes it as is
                scheme, feed = FP8Scheme.from_quantization_config(src_qc), None
            else:
                scheme = FP8Scheme.parse(opts.fp8_scheme, opts.fp8_block_size)
                feed = scheme
                cfg["quantization_config"] = scheme.quantization_config()
            quant = Quantization("fp8", scheme.name)
        else:
            raise ShardError(f"--quantization must be fp8 or none, got {opts.quantization!r}")
    except FP8Error as e:
        raise ShardError(str(e)) from None
    # vLLM 0.26 reads the legacy keys; newer transformers writes rope_parameters / dtype only.
    rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None:
        cfg.setdefault("rope_theta", rope_theta)
    cfg["torch_dtype"] = src.dtype
    return cfg, quant, feed


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())) or overwrite:
        return
    try:
        held = Manifest.load(out)
        what = (f"a vllm-gds shard output of {held.source.path} ({held.model.architecture}, "
                f"tp={held.parallel.tensor_parallel_size}, pp={held.parallel.pipeline_parallel_size}, "
                f"{held.quantization.method})")
    except ManifestError:
        what = "other files (not a complete vllm-gds shard output)"
    raise ShardError(f"{out}: already exists and holds {what}; refusing to replace it (pass --overwrite)")


def _publish(staging: Path, out: Path) -> None:
    """Atomically put the finished staging folder at ``out`` (replacing an old one only after it is complete)."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def working_set_bound(src: SourceCheckpoint) -> int:
    """Bytes a shard process holds beyond its ``base`` (see the module doc): read buffers, a batch's fp8 weights
    and parameter blocks, (2.5 + PARAM_BUDGET_BATCHES) x the largest read batch, whatever the model size or
    number of ranks."""
    return int((2.5 + PARAM_BUDGET_BATCHES) * max(b.nbytes for b in src.batch_plan(BATCH_BYTES)))


def _created_by() -> CreatedBy:
    from vllm_gds_plugin.compat import installed_vllm_version

    return CreatedBy(__version__, installed_vllm_version(), str(torch.__version__))


def _run_ranks(plan: _Plan, src: SourceCheckpoint, opts: ShardOptions) -> dict[str, RankEntry]:
    specs = [(p, t) for p in range(plan.pp) for t in range(plan.tp)]
    groups = [specs[i::opts.jobs] for i in range(min(opts.jobs, len(specs)))]
    progress = Progress(src.tensor_bytes * len(groups), "shard", opts.progress)
    ranks: dict[str, RankEntry] = {}
    try:
        if len(groups) == 1:
            progress.set_label(f"{len(specs)} rank(s)")
            ranks = shard_ranks(plan, specs, progress.update)
        else:  # each worker process reads (and quantizes) the source once for its ranks
            with ProcessPoolExecutor(max_workers=len(groups), mp_context=get_context("spawn")) as pool:
                for fut in [pool.submit(shard_ranks, plan, g) for g in groups]:
                    ranks.update(fut.result())
                    progress.update(src.tensor_bytes)
    finally:
        progress.close()
    return ranks


@contextmanager
def _writing(write_threads: int) -> Iterator[tuple[WriteQueue, list[PartFile]]]:
    """A writer and the part files given to it; on any failure pending writes are dropped and every file
    descriptor closed before the caller removes the staging folder."""
    writer, parts = WriteQueue(write_threads), []
    ok = False
    try:
        yield writer, parts
        ok = True
    finally:
        writer.close(cancel=not ok)
        for part in parts:
            part.abort()


@dataclass
class _Rank:
    """One rank being produced: its vLLM model, part files, write order and parameter memory."""
    key: str
    spec: object  # compat.model_build.RankSpec
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    files: list[PartFile]
    folder: Path
    schedule: WriteSchedule | None = None
    moved: MovedParams | None = None
    starts: list[list[str]] = field(default_factory=list)  # per batch: parameters it writes first
    ends: list[list[str]] = field(default_factory=list)  # per batch: parameters final after it
    span: dict[str, tuple[int, int]] = field(default_factory=dict)  # parameter -> (first, last) batch


def shard_ranks(plan: _Plan, rank_ids: list[tuple[int, int]], on_bytes: Callable[[int], None] | None = None,
                ) -> dict[str, RankEntry]:
    """Produce ranks ``rank_ids`` ((pp, tp) pairs) in one pass over the source: every batch is read and
    (FP8-)quantized once, then fed to each rank's vLLM model in turn; parameters go to disk as soon as they are
    final and their memory is reused (param_memory.py). Also the ``--jobs`` worker process entry point."""
    from vllm_gds_plugin.compat.model_build import (
        ModelBuildError, RankSpec, packed_modules_mapping, quantized_linear_prefixes, rank_model,
    )

    t0 = time.monotonic()
    src = SourceCheckpoint.open(plan.src)
    batch_plan = src.batch_plan(BATCH_BYTES)
    largest = max(b.nbytes for b in batch_plan)
    pool = BlockPool(PARAM_BUDGET_BATCHES * largest)
    quant = BlockPool(largest // 2)  # fp8 weights of one batch (at most half its bytes), fed to every rank
    phases = LAST_PHASES
    phases.clear()
    try:
        with ExitStack() as models, _writing(plan.write_threads) as (writer, parts), no_gc(), \
                _setting(torch.get_num_threads, torch.set_num_threads, plan.torch_threads), \
                _setting(sys.getswitchinterval, sys.setswitchinterval, GIL_SWITCH_INTERVAL_S):
            # Batch 0 is read while the ranks' models are built and their writes planned (its read was the main
            # thread's wait before the first quantization: 0.4 s of a 9 s fp8 shard on the H100 host); the
            # generator runs on that thread only for its first step.
            batches = iter(src.batches(BATCH_BYTES, on_bytes))
            first = models.enter_context(ThreadPoolExecutor(1, thread_name_prefix="vllm-gds-read-ahead")).submit(
                next, batches)
            built = []
            with _timed(phases, "build"):
                for p, t in rank_ids:
                    spec = RankSpec(t, plan.tp, p, plan.pp)
                    built.append((rank_key(p, t), spec, models.enter_context(rank_model(plan.staging, spec,
                                                                                       plan.dtype))[0]))
            select = None
            if plan.quantize is not None:
                select = linear_weight_selector(quantized_linear_prefixes(built[0][2]),
                                                packed_modules_mapping(built[0][2]))
            feed, batch_of = _feed_specs(batch_plan, plan.quantize, select)
            touch: dict[int, TouchPlan | None] = {}
            ranks = []
            with _timed(phases, "touch_plan"):
                for key, spec, model in built:
                    if spec.pp_rank not in touch:  # the same parameter names for every tp rank of a stage
                        touch[spec.pp_rank] = TouchPlan.learn(plan.staging, spec, plan.dtype, feed)
                    ranks.append(_open_rank(plan, key, spec, model, touch[spec.pp_rank], parts, writer))
                    _plan_rank(ranks[-1], touch[spec.pp_rank], batch_of, writer, pool)
            for b in range(len(batch_plan)):
                with _timed(phases, "read_wait"):
                    batch = first.result() if b == 0 else next(batches)
                taken: list[torch.Tensor] = []
                if select is not None:  # fp8 weights into reused blocks
                    with _timed(phases, "quantize"):
                        batch = list(quantize_stream(batch, plan.quantize, select,
                                                     partial(_fp8_out, quant, taken)))
                for r in ranks:
                    _load_batch(r, b, batch, plan, writer, phases)
                del batch
                for block in taken:
                    quant.give(block)
            next(batches, None)  # the reader's cleanup (buffers back to the pool)
            futures = {}
            with _timed(phases, "write_tail"):
                for r in ranks:
                    _check_scales_loaded([(n, p.data) for n, p in r.params.items()], plan.src)
                    r.schedule.finish()
                    futures[r.key] = writer.submit(_finish_rank, r)
                entries = {key: fut.result() for key, fut in futures.items()}
            phases.update({f"{kind}_busy": seconds for kind, seconds in writer.busy.items()})
    except ModelBuildError as e:
        raise ShardError(str(e)) from None
    finally:
        pool.clear()
        quant.clear()
    phases["total"] = time.monotonic() - t0
    phases["param_zero"] = pool.zeroing_s
    log.info("ranks %s: %.1f MiB in %.1f s (parameter memory peak %.0f MiB, budget %.0f MiB; seconds: %s)",
             ",".join(entries), sum(e.nbytes for e in entries.values()) / 2**20, phases["total"],
             pool.peak_in_use / 2**20, pool.budget / 2**20, ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    return entries


# Seconds per phase of the last shard_ranks call in this process (build, touch_plan, read_wait, quantize,
# param_memory, load, write_tail, total: the main thread's), for benchmarks and the log: where a slow run spends
# its time. Also the background threads' work (write_busy, hash_busy, checksum_busy: summed over their threads)
# and param_zero (zeroing reused parameter blocks, part of param_memory).
LAST_PHASES: dict[str, float] = {}


@contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    t = time.monotonic()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.monotonic() - t


# How long the main thread may keep the GIL while a helper thread waits for it (CPython's default is 5 ms). The
# writer and hasher threads take the GIL back after every pwrite and every torch op of a checksum; behind a main
# thread running vLLM's weight loaders each of those waits up to the whole interval. benchmarks/writer_gil.py on
# the 2-core box, the O_DIRECT writer and hasher beside a thread that only runs Python: 0.13 GB/s at 5 ms, 1.37 at
# 0.5, 2.28 at 0.1 (alone: 2.25-3.4). Whole fp8 shards changed within run-to-run noise, on the 2-core box
# (compute-bound) and on the GPU host (bench_shard-h100host-20261206-155513 against -141601).
GIL_SWITCH_INTERVAL_S = 1e-4


@contextmanager
def _setting(get: Callable[[], Any], put: Callable[[Any], object], value: Any) -> Iterator[None]:
    """A process-wide setting at ``value`` inside, restored afterwards: torch's intra-op threads for the
    sharder's copies and quantization (the ops are memory-bound, and every extra OpenMP thread spins between the
    many small ops of vLLM's weight loaders; --jobs processes each with all cores' threads oversubscribe the
    machine), and the GIL switch interval (GIL_SWITCH_INTERVAL_S)."""
    before = get()
    put(value)
    try:
        yield
    finally:
        put(before)


def _fp8_out(quant: BlockPool, taken: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    taken.append(quant.take(w.numel(), lambda: False, zeroed=False))  # every byte is overwritten
    return taken[-1].view(FP8_DTYPE).view(w.shape)


def _open_rank(plan: _Plan, key: str, spec, model: torch.nn.Module, touch: TouchPlan | None,
               parts: list[PartFile], writer: WriteQueue) -> _Rank:
    """The rank's part files, laid out in the order its parameters become final (by the touch plan; else vLLM's
    order): then every file is written front to back as loading goes, hashed on the way, never held back
    behind a parameter that is final later (which costs memory, or an out-of-order write and a re-read of the
    file to hash it)."""
    params = dict(model.named_parameters())
    names = list(params)
    if touch is not None:
        names.sort(key=lambda n: touch.last.get(n, len(touch.last)))  # stable: vLLM's order among equals
    folder = plan.staging / rank_dir(spec.pp_rank, spec.tp_rank)
    folder.mkdir()
    plan.striping.apply(folder)
    files = []
    for k, specs in enumerate(split_specs([spec_of(n, params[n].data) for n in names], plan.max_file_size)):
        rel = f"{folder.name}/part-{k}.safetensors"
        files.append(PartFile(folder / f"part-{k}.safetensors", rel, Layout.of(specs, {PATH_METADATA_KEY: rel}),
                              writer.hashing, direct=True, io=writer.io))
        parts.append(files[-1])
    return _Rank(key, spec, model, params, files, folder)


def _feed_specs(batch_plan: list, scheme: FP8Scheme | None, select: Callable[[str], bool] | None,
                ) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype]], list[int]]:
    """What load_weights will be fed, tensor by tensor (the quantized stream when quantizing), and the batch
    of each."""
    feed, batch_of = [], []
    for b, batch in enumerate(batch_plan):
        specs = quantized_specs(batch.specs, scheme, select) if select else batch.specs
        for spec in specs:
            feed.append(spec)
            batch_of.append(b)
    return feed, batch_of


def _plan_rank(r: _Rank, touch: TouchPlan | None, batch_of: list[int], writer: WriteQueue,
               pool: BlockPool) -> None:
    where = {e.name: f for f in r.files for e in f.layout.entries}
    if touch is not None:  # else: no plan, every parameter stays where vLLM put it until loading ends
        r.starts, r.ends = touch.by_batch(batch_of)
        r.span = {p: (batch_of[touch.first[p]], batch_of[touch.last[p]]) for p in touch.first}
        r.moved = MovedParams(pool, r.params, lambda: writer.error is None)

    def submit(name: str) -> None:
        release = None
        if r.moved is not None:
            r.moved.writing(name)
            release = partial(r.moved.release, name)
        writer.submit(where[name].write, name, r.params[name].data, release)

    r.schedule = WriteSchedule([(e.name, e.nbytes) for f in r.files for e in f.layout.entries], submit)


def _load_batch(r: _Rank, b: int, stream: list[tuple[str, torch.Tensor]], plan: _Plan, writer: WriteQueue,
                phases: dict[str, float]) -> None:
    from vllm_gds_plugin.compat.model_build import load_rank_weights

    if r.moved is not None:
        with _timed(phases, "param_memory"):  # includes waiting for blocks that writes still hold
            r.moved.move_in(r.starts[b] if b < len(r.starts) else [])
    try:
        with _timed(phases, "load"):
            touched = load_rank_weights(r.model, stream, r.spec)
    except (KeyError, ValueError, AssertionError, RuntimeError) as e:
        raise ShardError(f"{plan.src}: vLLM's load_weights rejected the checkpoint for rank {r.key}: "
                         f"{type(e).__name__}: {e}") from e
    writer.check()  # a failed write (disk full) stops the run now, not after loading everything
    if r.moved is None:
        return
    wrong = sorted(n for n in touched or () if not r.span.get(n, (b + 1, -1))[0] <= b <= r.span[n][1])
    if wrong:  # the plan learned on the meta model disagrees with this rank: never write stale bytes
        raise ShardError(f"rank {r.key}: load_weights wrote {wrong[:3]} in source batch {b}, which the touch "
                         "plan did not predict (please report this model)")
    if b < len(r.ends):
        r.schedule.final(r.ends[b])


def _finish_rank(r: _Rank) -> RankEntry:
    entry = RankEntry(tuple(f.finish() for f in r.files))
    fsync_dir(r.folder)
    return entry


def _check_scales_loaded(params: list[tuple[str, torch.Tensor]], src: Path) -> None:
    """vLLM initialises FP8 weight scales to float32 min; one left over means a weight never reached its
    parameter (a checkpoint name vLLM did not map), which would otherwise go unnoticed until inference."""
    lowest = torch.finfo(torch.float32).min
    for name, t in params:
        if name.endswith(("weight_scale", "weight_scale_inv")) and t.dtype == torch.float32 and (t == lowest).any():
            raise ShardError(f"{src}: parameter {name} was not (fully) loaded from the checkpoint; "
                             "the FP8 scales would be garbage")


def write_fp8_checkpoint(src_dir: Path, dst: Path, scheme: FP8Scheme, max_file_size: int = DEFAULT_MAX_FILE_SIZE,
                         durable: bool = True) -> Path:
    """Write a plain (unsharded) FP8 Hugging Face checkpoint in the layout vLLM's ``fp8`` method loads.

    The same quantizer and the same vLLM-derived choice of which weights to quantize as ``shard`` uses, so
    vLLM's default loader on this checkpoint fills parameters with exactly the bytes the shards hold. Streams:
    one source tensor and its quantized form in memory at a time. ``durable=False`` skips fsync (scratch)."""
    from vllm_gds_plugin.compat.model_build import (
        RankSpec, packed_modules_mapping, quantized_linear_prefixes, rank_model,
    )

    src = SourceCheckpoint.open(src_dir)
    dst = Path(dst)
    if dst.exists():
        raise ShardError(f"{dst}: already exists")
    staging = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    staging.mkdir(parents=True)
    files: list[PartFile] = []
    try:
        for p in src.side_files():
            shutil.copy2(p, staging / p.name)
        cfg = dict(src.config, quantization_config=scheme.quantization_config())
        (staging / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        with rank_model(staging, RankSpec(0, 1), src.dtype) as (model, _):
            select = linear_weight_selector(quantized_linear_prefixes(model), packed_modules_mapping(model))
        del model
        parts = split_specs(quantized_specs(src.specs(), scheme, select), max_file_size)
        stream = quantize_stream(src.tensors(), scheme, select)
        weight_map = {}
        for k, specs in enumerate(parts):
            fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
            # packed (alignment 1): no padding tensors, which vLLM's default loader would take for weights
            files.append(PartFile(staging / fname, fname, Layout.of(specs, {"format": "pt"}, alignment=1)))
            for spec in specs:
                name, t = next(stream)
                files[-1].write(name, t)
                weight_map[name] = fname
            files[-1].finish(durable)
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
        os.replace(staging, dst)
    except BaseException:
        for f in files:
            f.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst


def verify(out: Path) -> list[str]:
    """Re-hash every file of a shard output; return human-readable problems (empty: all good). Shard files are
    checked against their xxh3-128 and every tensor against its checksum (what the loader's GPU verification
    compares; version 2 manifests); the files copied from the source (tokenizer, generation config, TurboQuant
    calibration) against the source fingerprint's sha256, since they are byte copies."""
    m = Manifest.load(out)
    problems = []
    for name, sf in m.source.files.items():
        if not is_side_file(name) or name == "config.json":  # weights are not copied; config.json is rewritten
            continue
        path = Path(out) / name
        if not path.is_file():
            problems.append(f"{name}: missing (copied from the source)")
        elif (digest := sha256_file(path)) != sf.sha256:
            problems.append(f"{name}: sha256 {digest} != source fingerprint {sf.sha256}")
    for key, rank in m.ranks.items():
        for f in rank.files:
            path = Path(out) / f.path
            if not path.is_file():
                problems.append(f"{f.path}: missing (rank {key})")
            elif path.stat().st_size != f.size:
                problems.append(f"{f.path}: size {path.stat().st_size} != manifest {f.size} (rank {key})")
            else:
                problems += [f"{f.path}: {p} (rank {key})" for p in _file_problems(path, f)]
    return problems


def _file_problems(path: Path, f: FileEntry) -> list[str]:
    """The file's xxh3-128 and every tensor's checksum, from one mapping (the file is read from disk once)."""
    with open(path, "rb") as fh, (mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if f.size
                                  else contextlib.nullcontext(bytearray())) as mem:  # an empty file cannot be mapped
        problems = [] if (digest := xxhash.xxh3_128(mem).hexdigest()) == f.xxh3_128 else \
            [f"xxh3_128 {digest} != manifest {f.xxh3_128}"]
        data = torch.frombuffer(mem, dtype=torch.uint8) if f.size else torch.empty(0, dtype=torch.uint8)
        try:
            return problems + [f"tensor {t.name!r}: checksum {got} != manifest {t.checksum}" for t in f.tensors
                               if t.checksum is not None and
                               (got := tensor_checksum.checksum(data[t.offset:t.offset + t.nbytes])) != t.checksum]
        finally:
            del data  # the mapping closes only once no tensor views it


__all__ = ["ShardError", "ShardOptions", "shard", "shard_ranks", "verify", "working_set_bound",
           "write_fp8_checkpoint"]
