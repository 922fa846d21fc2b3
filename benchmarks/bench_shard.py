"""Benchmark `vllm-gds shard` on a synthetic Llama-3.1-8B-shaped checkpoint (random bf16, written once).

For every quantization (none, fp8) and TP size (1, 2, 4, 8): the sharder's wall time, bytes written, write GB/s,
CPU time and peak RSS, against the disk's sequential write bandwidth measured in the same run, on the same file
system, with the same number of bytes, with fsync, right after that shard run: once through the page cache
(``dd conv=fsync``) and once with O_DIRECT (``dd oflag=direct``); ``fraction_of_disk`` compares with the faster
of the two (issue 3's target: >= 0.8). Before each run the source is read once, so that every run finds it in
the page cache. Each shard runs in a fresh process (peak RSS = its VmHWM; ``--jobs``
worker processes are reported apart), which imports vLLM and the sharder's modules before the clock starts
(import time is reported: it is paid once per CLI run, not per byte). The load average is recorded with every
run, since a shared machine's other work slows both the sharder and the disk.

A discarded shard (the largest TP size, first quantization) runs before the timed ones (``--no-warmup`` skips it):
the first shard on a fresh GPU host spent 15.9 s (TP=1, bench_shard-h100host-20261206-155513) and 18.9 s (TP=2,
experiments/bench_shard-h100host-20261206-172508-pipelined-quant) in its model build where later runs took
0.2-1.3 s, a one-time cost of the machine (not .pyc compilation: compiling vLLM's bytecode first did not remove it).

Every in-process run also records the sharder's seconds per phase (``phases_s``: model build, touch plan,
waiting for reads, quantization, parameter memory, vLLM load_weights, final writes; sharder.LAST_PHASES).

Memory: every run records the sharder's documented bound (sharder.py) per process,
``rss_bound = base + working_set_bound + RSS_SLACK`` with base = the process's RSS after its imports and
working_set_bound = (2.5 + PARAM_BUDGET_BATCHES) x the largest read batch (here the 1.05 GB embedding), and
whether the peak stayed within it (``rss_within_bound``; for --jobs the largest worker's peak is checked).

    python benchmarks/bench_shard.py [--layers 32] [--tp 1 2 4 8] [--quantization none fp8] [--jobs J]
                                     [--write-threads W [W ...]] [--workdir DIR] [--time-budget-s S] [--no-warmup]

``--write-threads`` with several values runs every (quantization, TP) once per value, back to back (runs named
``fp8-tp8-w4``): an A/B of the writes in flight on the same machine, same source, same disk.

Disk space: source (~0.44 GB per layer + 2.1 GB) plus twice the largest output (the shard output, then the disk
test of the same size). --layers 32 (the real 8B) needs ~50 GB free; --layers 16 ~27 GB. ``--time-budget-s``
skips the runs that would start after that many seconds (recorded as skipped), for time-limited machines.
Results: benchmarks/results/bench_shard-<host>-<time>.json, and into $OUT when it is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py, also under python -P
from machine import out_copies, smi  # noqa: E402

LLAMA_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
                hidden_act="silu", bos_token_id=128000, eos_token_id=128001)


def write_source(root: Path, layers: int) -> Path:
    import torch
    from safetensors.torch import save_file

    src = root / f"llama8b-shape-{layers}l"
    if (src / ".complete").exists():
        return src
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    cfg = dict(LLAMA_8B, num_hidden_layers=layers)
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    h, i, v, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], 8 * 128
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)  # 16 Mi random values, reused

    def rnd(*shape: int) -> torch.Tensor:
        """Random-looking bf16 at memcpy speed (normal draws for 8 G values would dominate the script)."""
        n = 1
        for d in shape:
            n *= d
        start = int(torch.randint(0, pool.numel(), (1,), generator=g))
        reps = -(-(n + start) // pool.numel())
        return pool.repeat(reps)[start:start + n].reshape(shape).clone()

    weight_map = {}
    save_file({"model.embed_tokens.weight": rnd(v, h), "lm_head.weight": rnd(v, h), "model.norm.weight": rnd(h)},
              str(src / "model-embed.safetensors"))
    weight_map.update(dict.fromkeys(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"],
                                    "model-embed.safetensors"))
    for n in range(layers):  # one file per layer keeps this script's memory at one layer
        p = f"model.layers.{n}."
        t = {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
             p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
             p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
             p + "mlp.down_proj.weight": rnd(h, i), p + "input_layernorm.weight": rnd(h),
             p + "post_attention_layernorm.weight": rnd(h)}
        fname = f"model-layer{n:03d}.safetensors"
        save_file(t, str(src / fname))
        weight_map.update(dict.fromkeys(t, fname))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / ".complete").write_text("")
    return src


def disk_write_bandwidth(folder: Path, nbytes: int, direct: bool, chunk: int = 64 << 20) -> float:
    """Bytes/s of one sequential write of ``nbytes`` + fsync, like ``dd bs=64M conv=fsync`` (``oflag=direct``
    with ``direct``; 0.0 where the file system refuses O_DIRECT), from a page-aligned buffer of random bytes."""
    import errno
    import mmap

    path = folder / "dd.bin"
    buf = mmap.mmap(-1, chunk)
    buf.write(os.urandom(chunk))
    mv = memoryview(buf)
    os.sync()  # earlier runs' writeback is not charged to this measurement
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    t0 = time.perf_counter()
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if direct and e.errno == errno.EINVAL:
            return 0.0
        raise
    try:
        done = 0
        while done < nbytes:
            n = min(chunk, -(-(nbytes - done) // 4096) * 4096)
            done += os.pwrite(fd, mv[:n], done)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return done / dt


_CHILD = """
import json, os, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
# everything the sharder imports lazily, so that the clock below measures sharding, not importing
import vllm.model_executor.models.llama, vllm.engine.arg_utils, vllm.model_executor.model_loader.utils  # noqa
import vllm_gds_plugin.compat.model_build  # noqa
# vLLM imports its whole quantization registry (~0.8 s on the CPU box: every method's module, custom op
# registrations) the first time it verifies a quantized config, i.e. inside the first FP8 model build
from vllm.model_executor.layers.quantization import get_quantization_config  # noqa
get_quantization_config("fp8")
from vllm_gds_plugin.loading.sharder import LAST_PHASES, ShardOptions, shard, working_set_bound
from vllm_gds_plugin.loading.source import SourceCheckpoint
t1 = time.perf_counter()
a = json.loads(sys.argv[1])
def status(key):
    return int([ln for ln in open("/proc/self/status") if ln.startswith(key)][0].split()[1]) * 1024
base = status("VmRSS:")
c0 = os.times()
extra = {"write_threads": a["write_threads"]} if a["write_threads"] else {}
m = shard(ShardOptions(Path(a["src"]), Path(a["out"]), tensor_parallel_size=a["tp"], quantization=a["q"],
                       jobs=a["jobs"], progress=False, **extra))
t2 = time.perf_counter()
c1 = os.times()
print(json.dumps({"import_s": t1 - t0, "wall_s": t2 - t1, "bytes": sum(r.nbytes for r in m.ranks.values()),
                  "files": sum(len(r.files) for r in m.ranks.values()), "peak_rss_gib": status("VmHWM:") / 2**30,
                  "workers_peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
                  "base_rss_gib": base / 2**30, "phases_s": LAST_PHASES,
                  "working_set_bound_gib": working_set_bound(SourceCheckpoint.open(Path(a["src"]))) / 2**30,
                  "cpu_user_s": c1.user - c0.user + c1.children_user - c0.children_user,
                  "cpu_sys_s": c1.system - c0.system + c1.children_system - c0.children_system}))
"""
# vLLM's model objects of the ranks being made, small parameters (kept where vLLM put them), allocator slack
RSS_SLACK_GIB = 0.5


def warm(src: Path) -> float:
    """Read the source once (page cache), so every run starts from the same warm source; seconds taken."""
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for p in sorted(src.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def run_shard(src: Path, out: Path, tp: int, quantization: str, jobs: int, write_threads: int | None = None,
              ) -> dict:
    """One `shard` in a fresh process (VmHWM is per process image, unlike ru_maxrss which survives exec). It
    runs in the work folder so that a repository checkout in the current folder cannot shadow the installed
    plugin."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    arg = json.dumps({"src": str(src), "out": str(out), "tp": tp, "q": quantization, "jobs": jobs,
                      "write_threads": write_threads})
    load = os.getloadavg()
    proc = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, env=env,
                          cwd=out.parent)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["write_gb_s"] = r["bytes"] / r["wall_s"] / 1e9
    r["load_avg_before"], r["load_avg_after"] = load, os.getloadavg()
    # per process: the workers (--jobs) each hold their own share; base as measured in the parent process
    r["rss_bound_gib"] = r["base_rss_gib"] + r["working_set_bound_gib"] + RSS_SLACK_GIB
    multi = jobs > 1 and tp > 1
    r["rss_checked_gib"] = r["workers_peak_rss_gib"] if multi else r["peak_rss_gib"]
    r["rss_within_bound"] = r["rss_checked_gib"] <= r["rss_bound_gib"]
    shutil.rmtree(out, ignore_errors=True)
    return r


def versions() -> dict:
    import torch
    import triton
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "triton": triton.__version__,
            "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
            "driver": smi("driver_version"),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = real Llama-3.1-8B)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--quantization", choices=("none", "fp8"), nargs="+", default=["none", "fp8"])
    ap.add_argument("--jobs", type=int, default=1, help="ranks in parallel processes (shard --jobs)")
    ap.add_argument("--write-threads", type=int, nargs="+", default=[None],
                    help="shard --write-threads; several values: each run once per value (default: the sharder's)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "vllm-gds-bench")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="start no run after this many seconds (the rest is recorded as skipped)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the discarded first shard (module doc)")
    args = ap.parse_args()
    args.workdir = args.workdir.absolute()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    print(f"source: {args.layers}-layer Llama-3.1-8B shape in {args.workdir} ...", flush=True)
    src = write_source(args.workdir, args.layers)
    source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"source ready: {source_bytes / 1e9:.2f} GB ({time.monotonic() - t_start:.0f} s)", flush=True)
    runs: dict[str, dict] = {}
    skipped: list[str] = []
    warmup = None
    if not args.no_warmup:
        print(f"[{time.monotonic() - t_start:5.0f} s] warm-up shard (discarded) ...", flush=True)
        w = run_shard(src, args.workdir / "out-warmup", max(args.tp), args.quantization[0], args.jobs,
                      args.write_threads[0])
        warmup = {"tp": max(args.tp), "quantization": args.quantization[0], "wall_s": w["wall_s"],
                  "build_s": (w["phases_s"] or {}).get("build")}
        print(f"    {w['wall_s']:.1f} s (model build {warmup['build_s'] or 0:.1f} s)", flush=True)
    for q in args.quantization:
        for tp, wt in [(tp, wt) for tp in args.tp for wt in args.write_threads]:
            key = f"{q}-tp{tp}" + (f"-w{wt}" if len(args.write_threads) > 1 else "")
            if args.time_budget_s is not None and time.monotonic() - t_start > args.time_budget_s:
                skipped.append(key)
                continue
            print(f"[{time.monotonic() - t_start:5.0f} s] shard {key} jobs={args.jobs} ...", flush=True)
            warm_s = warm(src)
            r = run_shard(src, args.workdir / f"out-{key}", tp, q, args.jobs, wt)
            r["source_warm_read_s"] = warm_s
            # the disk, right after the run, with the bytes the run wrote, where it wrote them
            buffered = disk_write_bandwidth(args.workdir, r["bytes"], direct=False)
            direct = disk_write_bandwidth(args.workdir, r["bytes"], direct=True)
            r["disk_buffered_gb_s"], r["disk_direct_gb_s"] = buffered / 1e9, direct / 1e9
            r["disk_gb_s"] = max(buffered, direct) / 1e9
            r["fraction_of_disk"] = r["write_gb_s"] / r["disk_gb_s"]
            runs[key] = r
            r["write_threads"] = wt
            print(f"    {r['bytes'] / 1e9:.2f} GB in {r['wall_s']:.1f} s = {r['write_gb_s']:.2f} GB/s = "
                  f"{100 * r['fraction_of_disk']:.0f}% of the disk ({r['disk_gb_s']:.2f} GB/s; buffered+fsync "
                  f"{buffered / 1e9:.2f}, O_DIRECT {direct / 1e9:.2f}), peak RSS {r['peak_rss_gib']:.2f} GiB"
                  + (f" (workers {r['workers_peak_rss_gib']:.2f})" if args.jobs > 1 else "")
                  + f" {'<=' if r['rss_within_bound'] else '> !!'} bound {r['rss_bound_gib']:.2f}"
                  + f", CPU {r['cpu_user_s']:.1f} user + {r['cpu_sys_s']:.1f} sys s, load "
                  f"{r['load_avg_before'][0]:.1f} (+{r['import_s']:.1f} s importing)", flush=True)
            if r["phases_s"]:  # in-process runs: where the sharder's time went
                print("    seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items()), flush=True)
    if skipped:
        print(f"skipped (time budget): {', '.join(skipped)}")
    result = {"benchmark": "bench_shard", "command": " ".join([sys.executable, *sys.argv]), **versions(),
              "layers": args.layers, "jobs": args.jobs, "workdir": str(args.workdir),
              "source_bytes": source_bytes, "runs": runs, "skipped": skipped, "warmup": warmup,
              "rss_slack_gib": RSS_SLACK_GIB,
              "bench_wall_s": time.monotonic() - t_start,
              "load_avg_end": os.getloadavg()}
    name = f"bench_shard-{platform.node()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for path in out_copies(Path(__file__).parent / "results" / name):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
