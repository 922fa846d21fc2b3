"""``vllm-gds shard``: HF checkpoint -> (FP8) -> one folder of aligned safetensors per (pp, tp) rank + manifest.

Every rank's bytes come from vLLM itself: the sharder builds vLLM's model class as that rank (see
compat/model_build.py), feeds the (FP8-quantized) source tensors through the model's own ``load_weights``, and
saves ``named_parameters()`` as they are then, i.e. before ``process_weights_after_loading``. No per-architecture
slicing rules live here.

Throughput: the source is read into reused buffers (TP=1) or memory-mapped (TP>1, where a rank uses slices),
fed in batches, and each parameter goes to disk with O_DIRECT on a writer thread as soon as it is final (see
write_schedule.py, writer.py), so disk writes overlap loading within a rank and across ranks (rank r+1 loads while rank r is written; at most two ranks are in memory). The source's
sha256 runs on background threads meanwhile. ``--jobs J`` runs ranks in J processes instead.

Crash safety: everything is written into ``OUT.tmp-<pid>`` and renamed to ``OUT`` after the manifest (written
last) is on disk; any failure or Ctrl-C removes the temporary folder, so OUT is either absent/untouched or
complete.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

from vllm_gds_plugin import __version__
from vllm_gds_plugin.loading.fp8 import (
    FP8Error, FP8Scheme, linear_weight_selector, quantize_stream, quantized_specs,
)
from vllm_gds_plugin.loading.lustre import Striping
from vllm_gds_plugin.loading.manifest import (
    CreatedBy, Manifest, ManifestError, ModelInfo, Parallel, Quantization, RankEntry, Source,
    config_digest, fsync_dir, rank_dir, rank_key, xxh3_128_file,
)
from vllm_gds_plugin.loading.progress import Progress
from vllm_gds_plugin.loading.source import (
    ShardError, SourceCheckpoint, is_side_file, release_read_buffers, sha256_file,
)
from vllm_gds_plugin.loading.write_schedule import WriteSchedule
from vllm_gds_plugin.loading.writer import (
    PATH_METADATA_KEY, Layout, PartFile, WriteQueue, spec_of, split_specs,
)

log = logging.getLogger(__name__)

# 1 GiB parts: an 8B model's rank still has few files, and the loader's verify-while-loading hashes the files of
# a rank on parallel threads, which only keeps up with the reads when a rank has several parts (see README).
DEFAULT_MAX_FILE_SIZE = 1 << 30
_FP8_SCRATCH = ".fp8-source"  # inside the staging folder; removed before the manifest is written
# Source bytes per load_weights call: small enough that writing starts early, large enough to hold a layer.
BATCH_BYTES = 256 << 20


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


def shard(opts: ShardOptions) -> Manifest:
    """Run the sharder; return the manifest of the complete OUT folder. Raises ShardError on bad input."""
    src = SourceCheckpoint.open(opts.src)
    tp, pp = opts.tensor_parallel_size, opts.pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise ShardError(f"--tensor-parallel-size and --pipeline-parallel-size must be >= 1 (got {tp}, {pp})")
    if opts.jobs < 1:
        raise ShardError(f"--jobs must be >= 1 (got {opts.jobs})")
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
        feed = src.root
        if feed_scheme is not None and tp * pp > 1:
            # Quantize once, not once per rank (per-tensor scales need whole tensors, so every rank would
            # quantize the whole model): ranks then load this scratch FP8 checkpoint as vLLM loads any FP8 one.
            feed = write_fp8_checkpoint(src.root, staging / _FP8_SCRATCH, feed_scheme, durable=False)
            feed_scheme = None
        plan = _Plan(feed, staging, tp, pp, src.dtype, feed_scheme, opts.max_file_size, opts.striping)
        ranks = _run_ranks(plan, src, opts)
        shutil.rmtree(staging / _FP8_SCRATCH, ignore_errors=True)
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


def _created_by() -> CreatedBy:
    from vllm_gds_plugin.compat import installed_vllm_version

    return CreatedBy(__version__, installed_vllm_version(), str(torch.__version__))


def _run_ranks(plan: _Plan, src: SourceCheckpoint, opts: ShardOptions) -> dict[str, RankEntry]:
    specs = [(p, t) for p in range(plan.pp) for t in range(plan.tp)]
    progress = Progress(src.tensor_bytes * len(specs), "shard", opts.progress)
    ranks: dict[str, RankEntry] = {}
    try:
        if opts.jobs == 1 or len(specs) == 1:
            with _writing() as (writer, parts):
                pending: deque[tuple[str, Future]] = deque()
                for p, t in specs:
                    while len(pending) >= 2:  # rank r-1 on disk before rank r+1 is built: two ranks in memory
                        _collect(ranks, *pending.popleft())
                    progress.set_label(f"rank {rank_key(p, t)}")
                    pending.append((rank_key(p, t), _rank_job(plan, p, t, writer, parts, progress.update)))
                while pending:
                    _collect(ranks, *pending.popleft())
        else:  # one vLLM model per worker process: memory stays at `jobs` ranks' working sets
            with ProcessPoolExecutor(max_workers=opts.jobs, mp_context=get_context("spawn")) as pool:
                futures = {rank_key(p, t): pool.submit(shard_rank, plan, p, t) for p, t in specs}
                for key, fut in futures.items():
                    ranks[key] = fut.result()
                    progress.update(src.tensor_bytes)
    finally:
        progress.close()
    return ranks


def _collect(ranks: dict[str, RankEntry], key: str, fut: Future) -> None:
    ranks[key] = fut.result()
    gc.collect()  # the finished rank's model (vLLM modules hold reference cycles) before the next is built


@contextmanager
def _writing() -> Iterator[tuple[WriteQueue, list[PartFile]]]:
    """A writer thread and the part files given to it; on any failure pending writes are dropped and every
    file descriptor closed before the caller removes the staging folder."""
    writer, parts = WriteQueue(), []
    ok = False
    try:
        yield writer, parts
        ok = True
    finally:
        writer.close(cancel=not ok)
        for part in parts:
            part.abort()


def shard_rank(plan: _Plan, pp_rank: int, tp_rank: int) -> RankEntry:
    """Produce rank (pp_rank, tp_rank) completely (the ``--jobs`` worker process entry point)."""
    with _writing() as (writer, parts):
        return _rank_job(plan, pp_rank, tp_rank, writer, parts).result()


def _rank_job(plan: _Plan, pp_rank: int, tp_rank: int, writer: WriteQueue, parts: list[PartFile],
              on_bytes: Callable[[int], None] | None = None) -> Future:
    """Build rank (pp_rank, tp_rank) with vLLM and load the source through its load_weights; parameters are
    queued on ``writer`` as they become final. Returns the future of the rank's manifest entry, done when all
    its files are on disk."""
    from vllm_gds_plugin.compat.model_build import ModelBuildError, RankSpec, rank_model

    t0 = time.monotonic()
    key = rank_key(pp_rank, tp_rank)
    try:
        with rank_model(plan.staging, RankSpec(tp_rank, plan.tp, pp_rank, plan.pp), plan.dtype) as (model, _):
            params = [(n, p.data) for n, p in model.named_parameters()]
            folder = plan.staging / rank_dir(pp_rank, tp_rank)
            folder.mkdir()
            plan.striping.apply(folder)
            files = _open_parts(plan, folder, params, parts, writer)
            where = {e.name: f for f in files for e in f.layout.entries}
            tensors = dict(params)
            schedule = WriteSchedule([(e.name, tensors[e.name]) for f in files for e in f.layout.entries],
                                     lambda name, t: writer.submit(where[name].write, name, t))
            _load(model, plan, key, schedule, writer, on_bytes)
    except ModelBuildError as e:
        raise ShardError(str(e)) from None
    _check_scales_loaded(params, plan.src)
    schedule.finish()

    def finish() -> RankEntry:
        entry = RankEntry(tuple(f.finish() for f in files))
        fsync_dir(folder)
        log.info("rank %s: %d file(s), %.1f MiB in %.1f s (%d early write(s) redone)", key, len(files),
                 entry.nbytes / 2**20, time.monotonic() - t0, schedule.rewrites)
        return entry

    return writer.submit(finish)


def _open_parts(plan: _Plan, folder: Path, params: list[tuple[str, torch.Tensor]], parts: list[PartFile],
                writer: WriteQueue) -> list[PartFile]:
    files = []
    for k, specs in enumerate(split_specs([spec_of(n, t) for n, t in params], plan.max_file_size)):
        rel = f"{folder.name}/part-{k}.safetensors"
        files.append(PartFile(folder / f"part-{k}.safetensors", rel, Layout.of(specs, {PATH_METADATA_KEY: rel}),
                              writer.hasher, direct=True))
        parts.append(files[-1])
    return files


def _load(model: torch.nn.Module, plan: _Plan, key: str, schedule: WriteSchedule, writer: WriteQueue,
          on_bytes: Callable[[int], None] | None) -> None:
    from vllm_gds_plugin.compat.model_build import load_rank_weights, packed_modules_mapping, quantized_linear_prefixes

    src = SourceCheckpoint.open(plan.src)
    select = None
    if plan.quantize is not None:
        select = linear_weight_selector(quantized_linear_prefixes(model), packed_modules_mapping(model))
    for batch in src.batches(BATCH_BYTES, on_bytes, mapped=plan.tp * plan.pp > 1):
        stream = quantize_stream(batch, plan.quantize, select) if select else batch
        try:
            touched = load_rank_weights(model, stream)
        except (KeyError, ValueError, AssertionError, RuntimeError) as e:
            raise ShardError(f"{plan.src}: vLLM's {src.architecture}.load_weights rejected the checkpoint for "
                             f"rank {key}: {type(e).__name__}: {e}") from e
        writer.check()  # a failed write (disk full) stops the run now, not after loading everything
        if touched is not None:  # a model that does not report what it loaded is written when loading ends
            schedule.after_batch(touched)


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
    checked against their xxh3-128; the files copied from the source (tokenizer, generation config, TurboQuant
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
            elif (digest := xxh3_128_file(path)) != f.xxh3_128:
                problems.append(f"{f.path}: xxh3_128 {digest} != manifest {f.xxh3_128} (rank {key})")
    return problems


__all__ = ["ShardError", "ShardOptions", "shard", "shard_rank", "verify", "write_fp8_checkpoint"]
