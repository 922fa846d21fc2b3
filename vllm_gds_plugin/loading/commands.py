"""``vllm-gds shard | inspect | verify``.

    vllm-gds shard SRC OUT --tensor-parallel-size N [--pipeline-parallel-size M] [--quantization fp8|none]
        [--fp8-scheme per-tensor|block] [--fp8-block-size 128,128] [--max-file-size 1GiB]
        [--stripe-count 8 --stripe-size 16M] [--jobs J] [--write-threads W] [--overwrite]
    vllm-gds shard SRC DST --hf-out [--fp8-scheme ...]   # plain FP8 HF checkpoint, no sharding
    vllm-gds inspect OUT     # manifest summary
    vllm-gds verify OUT      # re-hash every file; exit 1 and list mismatches
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4GiB', '512M', '1000000' -> bytes (binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def parse_block(text: str) -> tuple[int, int]:
    try:
        n, k = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fp8-block-size wants N,K (e.g. 128,128), got {text!r}") from None
    return n, k


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the loading subcommands on the ``vllm-gds`` parser."""
    from vllm_gds_plugin.loading.lustre import DEFAULT_STRIPE_COUNT, DEFAULT_STRIPE_SIZE
    from vllm_gds_plugin.loading.writer import WRITE_THREADS

    p = sub.add_parser("shard", help="split (and FP8-quantize) an HF checkpoint into per-rank shards",
                       description="Produce OUT for `vllm serve OUT --load-format gds-sharded`: each rank's "
                                   "parameters exactly as vLLM's own weight loading lays them out.")
    p.add_argument("src", type=Path, help="Hugging Face checkpoint folder (safetensors)")
    p.add_argument("out", type=Path, help="output folder (created atomically)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--quantization", choices=("fp8", "none"), default="fp8")
    p.add_argument("--fp8-scheme", choices=("per-tensor", "per-channel", "block"), default="per-tensor",
                   help="per-channel is refused: vLLM's fp8 method cannot load it from a checkpoint")
    p.add_argument("--fp8-block-size", type=parse_block, default=(128, 128), metavar="N,K")
    p.add_argument("--max-file-size", type=parse_size, default="1GiB",
                   help="per part file (default 1GiB: the loader hashes a rank's parts on parallel threads when "
                        "verifying, so several parts per rank let verification keep up with the reads; a "
                        "larger tensor gets a part of its own)")
    p.add_argument("--stripe-count", type=int, default=DEFAULT_STRIPE_COUNT,
                   help=f"Lustre stripe count of rank folders when lfs is on PATH (default {DEFAULT_STRIPE_COUNT})")
    p.add_argument("--stripe-size", default=DEFAULT_STRIPE_SIZE,
                   help=f"Lustre stripe size (default {DEFAULT_STRIPE_SIZE})")
    p.add_argument("--jobs", "-j", type=int, default=1,
                   help="ranks produced in parallel processes (default 1: one process overlapping loading with "
                        "writing, two ranks in memory; J>1 holds J ranks and imports vLLM J times)")
    p.add_argument("--write-threads", type=int, default=WRITE_THREADS,
                   help=f"shard file writes in flight at once per process (default {WRITE_THREADS}; more for a "
                        "Lustre folder striped over many servers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--hf-out", action="store_true",
                   help="instead of shards, write OUT as a plain FP8 HF checkpoint (vLLM's default loader reads it)")
    p.set_defaults(func=_shard)

    p = sub.add_parser("inspect", help="summarize a shard output's manifest")
    p.add_argument("out", type=Path)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="re-hash every shard file against the manifest")
    p.add_argument("out", type=Path)
    p.set_defaults(func=_verify)


@contextlib.contextmanager
def _quiet_vllm() -> Iterator[None]:
    """vLLM's per-rank config chatter is not ours: WARNING for vLLM while the command runs. Restored after, so
    an in-process caller's later engines (which re-read the variable) log as before."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    before = os.environ.get("VLLM_LOGGING_LEVEL")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLLM_LOGGING_LEVEL", None)


def _shard(args: argparse.Namespace) -> int:
    with _quiet_vllm():
        return _shard_quietly(args)


def _shard_quietly(args: argparse.Namespace) -> int:
    from vllm_gds_plugin.loading.fp8 import FP8Error, FP8Scheme
    from vllm_gds_plugin.loading.lustre import Striping
    from vllm_gds_plugin.loading.sharder import ShardError, ShardOptions, shard, write_fp8_checkpoint

    try:
        if args.hf_out:
            if args.quantization != "fp8" or args.tensor_parallel_size != 1 or args.pipeline_parallel_size != 1:
                raise ShardError("--hf-out writes an unsharded FP8 checkpoint: use it with --quantization fp8 "
                                 "and no parallel sizes")
            scheme = FP8Scheme.parse(args.fp8_scheme, args.fp8_block_size)
            write_fp8_checkpoint(args.src, args.out, scheme, args.max_file_size)
            print(f"wrote FP8 ({scheme.name}) checkpoint {args.out}")
            return 0
        m = shard(ShardOptions(
            src=args.src, out=args.out, tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size, quantization=args.quantization,
            fp8_scheme=args.fp8_scheme, fp8_block_size=args.fp8_block_size, max_file_size=args.max_file_size,
            striping=Striping(args.stripe_count, args.stripe_size), jobs=args.jobs, write_threads=args.write_threads,
            overwrite=args.overwrite))
    except (ShardError, FP8Error) as e:
        print(f"vllm-gds shard: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vllm-gds shard: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    print(summary(m))
    return 0


def summary(m) -> str:
    """Human-readable manifest summary (what ``inspect`` prints)."""
    q = m.quantization
    lines = [f"{m.origin}",
             f"  model: {m.model.architecture} ({m.model.dtype}), source {m.source.path}",
             f"  parallel: tp={m.parallel.tensor_parallel_size} pp={m.parallel.pipeline_parallel_size}",
             f"  quantization: {q.method}" + (f" ({q.scheme})" if q.scheme else ""),
             f"  created by: vllm-gds-plugin {m.created_by.plugin}, vLLM {m.created_by.vllm}, "
             f"torch {m.created_by.torch}"]
    for key, rank in m.ranks.items():
        n = sum(len(f.tensors) for f in rank.files)
        lines.append(f"  rank {key}: {len(rank.files)} file(s), {n} tensors, {rank.nbytes / 2**20:.1f} MiB")
    total = sum(r.nbytes for r in m.ranks.values())
    lines.append(f"  total: {total / 2**30:.3f} GiB")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from vllm_gds_plugin.loading.manifest import Manifest, ManifestError

    try:
        print(summary(Manifest.load(args.out)))
    except ManifestError as e:
        print(f"vllm-gds inspect: error: {e}", file=sys.stderr)
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    from vllm_gds_plugin.loading.manifest import ManifestError
    from vllm_gds_plugin.loading.sharder import verify

    try:
        problems = verify(args.out)
    except ManifestError as e:
        print(f"vllm-gds verify: error: {e}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"MISMATCH {p}")
    print(f"{args.out}: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'OK'}")
    return 1 if problems else 0
