"""Benchmark `vllm-gds shard` on a synthetic Llama-3.1-8B-shaped checkpoint (random bf16, written once).

For TP=1,2,4,8: wall time, shard bytes written, write GB/s, peak RSS of the sharding process, against the disk's
sequential write bandwidth measured in the same run (one large write + fsync). Each shard runs in its own
process so peak RSS (VmHWM) is per run; the process imports vLLM before the clock starts (import time is
reported separately: it is paid once per CLI run, not per byte). The source stays in the page cache between
runs (written by this script just before). Results: benchmarks/results/bench_shard-<host>-<time>.json.

    python benchmarks/bench_shard.py [--layers 32] [--tp 1 2 4 8] [--quantization none|fp8] [--jobs J]
                                     [--workdir DIR] [--disk-test-gib 4]

Full 8B (--layers 32) needs ~16 GB for the source plus the largest output (~16 GB) on the work disk.
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


def disk_write_bandwidth(folder: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    """Bytes/s of one large sequential write + fsync (what the sharder's writes are compared with)."""
    path = folder / "dd.bin"
    buf = os.urandom(chunk)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(nbytes // chunk):
            f.write(buf)
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return nbytes / dt


_CHILD = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import vllm.model_executor.models.llama  # noqa: F401  (the import is timed apart from the sharding)
from vllm_gds_plugin.loading.sharder import ShardOptions, shard
t1 = time.perf_counter()
a = json.loads(sys.argv[1])
m = shard(ShardOptions(Path(a["src"]), Path(a["out"]), tensor_parallel_size=a["tp"], quantization=a["q"],
                       jobs=a["jobs"], progress=False))
t2 = time.perf_counter()
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"import_s": t1 - t0, "wall_s": t2 - t1, "bytes": sum(r.nbytes for r in m.ranks.values()),
                  "files": sum(len(r.files) for r in m.ranks.values()), "peak_rss_gib": int(hwm) / 2**20}))
"""


def run_shard(src: Path, out: Path, tp: int, quantization: str, jobs: int) -> dict:
    """One `shard` in a fresh process (VmHWM is per process image, unlike ru_maxrss which survives exec)."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    arg = json.dumps({"src": str(src), "out": str(out), "tp": tp, "q": quantization, "jobs": jobs})
    proc = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["write_gb_s"] = r["bytes"] / r["wall_s"] / 1e9
    shutil.rmtree(out, ignore_errors=True)
    return r


def versions() -> dict:
    import torch
    import triton
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "triton": triton.__version__,
            "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
            "driver": (subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                      capture_output=True, text=True).stdout.strip()
                       if shutil.which("nvidia-smi") else None),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = real Llama-3.1-8B)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--quantization", choices=("none", "fp8"), default="none")
    ap.add_argument("--jobs", type=int, default=1, help="ranks in parallel processes (shard --jobs)")
    ap.add_argument("--disk-test-gib", type=float, default=4, help="size of the raw write + fsync test")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "vllm-gds-bench")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = write_source(args.workdir, args.layers)
    test_bytes = int(args.disk_test_gib * 2**30)
    runs = {}
    for tp in args.tp:
        # The disk is measured right before each run (a shared machine's disk varies from minute to minute);
        # fraction_of_disk compares with that, fraction_of_best_disk with the best figure of the whole run.
        disk_now = disk_write_bandwidth(args.workdir, test_bytes)
        r = run_shard(src, args.workdir / f"out-tp{tp}", tp, args.quantization, args.jobs)
        r["disk_write_gb_s"] = disk_now / 1e9
        r["fraction_of_disk"] = r["write_gb_s"] * 1e9 / disk_now
        runs[f"tp{tp}"] = r
        print(f"tp={tp}: {r['bytes'] / 1e9:.2f} GB in {r['wall_s']:.1f} s = {r['write_gb_s']:.2f} GB/s, disk "
              f"{disk_now / 1e9:.2f} GB/s just before ({100 * r['fraction_of_disk']:.0f}%), peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB (+{r['import_s']:.1f} s importing vLLM)", flush=True)
    disk_after = disk_write_bandwidth(args.workdir, test_bytes)
    print(f"disk sequential write after the runs: {disk_after / 1e9:.2f} GB/s")
    disk = max([disk_after] + [r["disk_write_gb_s"] * 1e9 for r in runs.values()])
    for r in runs.values():
        r["fraction_of_best_disk"] = r["write_gb_s"] * 1e9 / disk
    result = {"benchmark": "bench_shard", "command": " ".join([sys.executable, *sys.argv]), **versions(),
              "layers": args.layers, "quantization": args.quantization, "jobs": args.jobs,
              "best_disk_write_gb_s": disk / 1e9, "disk_write_gb_s_after": disk_after / 1e9,
              "disk_test_bytes": test_bytes,
              "source_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")), "runs": runs,
              "load_avg_end": os.getloadavg()}
    dest = Path(__file__).parent / "results" / f"bench_shard-{platform.node()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {dest}")


if __name__ == "__main__":
    main()
