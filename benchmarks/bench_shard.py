"""Benchmark `vllm-gds shard` on a synthetic Llama-3.1-8B-shaped checkpoint (random bf16, written once).

For TP=1,2,4,8: wall time, shard bytes written, write GB/s, peak RSS of the sharding process, against the disk's
sequential write bandwidth measured in the same run (one large write + fsync). Each shard runs in its own
process so peak RSS is per run. Results: benchmarks/results/bench_shard-<host>-<time>.json.

    python benchmarks/bench_shard.py [--layers 32] [--tp 1 2 4 8] [--quantization none|fp8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

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


def disk_write_bandwidth(folder: Path, nbytes: int = 2 << 30, chunk: int = 64 << 20) -> float:
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


def run_shard(src: Path, out: Path, tp: int, quantization: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    code = ("import resource,sys,time,json;from pathlib import Path;"
            "from vllm_gds_plugin.loading.sharder import shard,ShardOptions;t=time.perf_counter();"
            f"m=shard(ShardOptions(Path({str(src)!r}),Path({str(out)!r}),tensor_parallel_size={tp},"
            f"quantization={quantization!r},progress=False));"
            "print(json.dumps({'wall_s':time.perf_counter()-t,'bytes':sum(r.nbytes for r in m.ranks.values()),"
            "'peak_rss_gib':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20}))")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
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
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "vllm-gds-bench")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = write_source(args.workdir, args.layers)
    disk = disk_write_bandwidth(args.workdir)
    print(f"disk sequential write: {disk / 1e9:.2f} GB/s")
    runs = {}
    for tp in args.tp:
        r = run_shard(src, args.workdir / f"out-tp{tp}", tp, args.quantization)
        r["fraction_of_disk"] = r["write_gb_s"] * 1e9 / disk
        runs[f"tp{tp}"] = r
        print(f"tp={tp}: {r['bytes'] / 1e9:.2f} GB in {r['wall_s']:.1f} s = {r['write_gb_s']:.2f} GB/s "
              f"({100 * r['fraction_of_disk']:.0f}% of disk), peak RSS {r['peak_rss_gib']:.2f} GiB")
    result = {"benchmark": "bench_shard", "command": " ".join([sys.executable, *sys.argv]), **versions(),
              "layers": args.layers, "quantization": args.quantization, "disk_write_gb_s": disk / 1e9,
              "source_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")), "runs": runs,
              "bench_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    dest = Path(__file__).parent / "results" / f"bench_shard-{platform.node()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {dest}")


if __name__ == "__main__":
    main()
