"""``vllm serve`` time-to-ready, ``--load-format gds-sharded`` vs vLLM's default loader, Llama-3.1-8B-shaped FP8.

Same weights both ways (constant dummy values: readiness does not depend on them): an FP8 (per-tensor) HF
checkpoint with Llama-3.1-8B's names and shapes, and its ``vllm-gds shard`` output. For each, a fresh
``vllm serve`` on a loopback port (its own process group, files warm in the page cache), timed from process start
until ``GET /health`` answers 200 (polled every 50 ms); then one completion request proves it serves. Loaders are
started in ABBA order (``--rounds 2``) and each one's faster start is compared: the first engine on a machine
pays for caches the later ones reuse. The
weight-loading share comes from vLLM's own log: "Model loading took X GiB and Y seconds" (both loaders),
"Loading weights took" (default loader) and our "gds-sharded rank ...: seconds=" line.

One GPU call of its own (~5 min on the H100: ~8 GB checkpoint written, sharded, four engines started):

    python3 benchmarks/bench_ready.py --dir /tmp/bench-ready

Results: benchmarks/results/bench_ready-<utc>.json (rendered by report.py's render_load).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench_load import HEAD, HIDDEN, INTER, KV, LAYERS, LLAMA_8B_CONFIG, Q, VOCAB, Budget, versions, warm
from vllm_gds_plugin.localserver import free_port, post_json, stop, vllm_command, wait_healthy

# Lines of the engine's log worth keeping, and the seconds they carry.
LOG_SECONDS = {
    "model_loading_s": r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) seconds",
    "loading_weights_s": r"Loading weights took ([\d.]+) seconds",
    "gds_sharded_s": r"gds-sharded rank pp0-tp0: .*? seconds=([\d.]+)",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)",
}


def write_hf_fp8_checkpoint(dst: Path) -> None:
    """An FP8 (per-tensor, the layout of vLLM's ``fp8`` method) HF checkpoint with Llama-3.1-8B's names and
    shapes and constant dummy values: written at disk speed, no quantization pass."""
    from safetensors.torch import save_file

    from vllm_gds_plugin.loading.fp8 import FP8Scheme

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.full((VOCAB, HIDDEN), 0.01, dtype=torch.bfloat16),
                                        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                                        "lm_head.weight": torch.full((VOCAB, HIDDEN), 0.01, dtype=torch.bfloat16)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name, shape in (("self_attn.q_proj", (Q * HEAD, HIDDEN)), ("self_attn.k_proj", (KV * HEAD, HIDDEN)),
                            ("self_attn.v_proj", (KV * HEAD, HIDDEN)), ("self_attn.o_proj", (HIDDEN, Q * HEAD)),
                            ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)),
                            ("mlp.down_proj", (HIDDEN, INTER))):
            w = torch.empty(shape, dtype=torch.float8_e4m3fn)
            w.view(torch.uint8).fill_(0x28)  # 0.03125 in e4m3
            tensors[f"{p}.{name}.weight"] = w
            tensors[f"{p}.{name}.weight_scale"] = torch.tensor(0.01, dtype=torch.float32)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    weight_map, part, size, k = {}, {}, 0, 0
    for name, t in tensors.items():
        part[name] = t
        size += t.numel() * t.element_size()
        if size > 2 << 30 or name == next(reversed(tensors)):
            fname = f"model-{k:05d}.safetensors"
            save_file(part, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
            part, size, k = {}, 0, k + 1
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(LLAMA_8B_CONFIG, quantization_config=FP8Scheme("per-tensor").quantization_config())
    (tmp / "config.json").write_text(json.dumps(cfg))
    tmp.rename(dst)


SHARD_CHILD = """
import sys
from pathlib import Path
from vllm_gds_plugin.loading.sharder import ShardOptions, shard
shard(ShardOptions(src=Path(sys.argv[1]), out=Path(sys.argv[2]), quantization="fp8", overwrite=True))
"""


def shard_child(src: Path, out: Path, timeout_s: float) -> float:
    """``vllm-gds shard`` in a fresh interpreter (from /tmp with -P: the repo must not shadow the installed plugin)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-P", "-c", SHARD_CHILD, str(src), str(out)], cwd="/tmp",
                       capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        raise RuntimeError(f"shard exit {p.returncode}: {(p.stdout + p.stderr)[-2000:]}")
    return time.perf_counter() - t


def serve_until_healthy(model: Path, load_format: str, extra: list[str], log_path: Path, timeout_s: float) -> dict:
    """Start ``vllm serve``; seconds from Popen to /health 200, one completion, the log's loading seconds."""
    port = free_port()
    cmd = vllm_command(model, port, "--load-format", load_format, "--max-model-len", "4096",
                       "--gpu-memory-utilization", "0.85", "--skip-tokenizer-init", *extra)
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd="/tmp", start_new_session=True)
    try:
        wait_healthy(proc, base, log_path, timeout_s - (time.perf_counter() - t0), poll_s=0.05)
        ready = time.perf_counter() - t0
        out = post_json(base + "/v1/completions", {"model": str(model), "prompt": [1, 2, 3, 4], "max_tokens": 4,
                                                   "temperature": 0.0})
        res: dict = {"time_to_ready_s": round(ready, 2), "completion_tokens": out["usage"]["completion_tokens"]}
    finally:
        stop(proc)
    text = log_path.read_text(errors="replace")
    for key, pattern in LOG_SECONDS.items():
        if m := re.search(pattern, text):
            res[key] = float(m.group(1))
    res["log_lines"] = [ln[-300:] for ln in text.splitlines()
                        if any(re.search(p, ln) for p in LOG_SECONDS.values())]
    if "model_loading_s" in res:
        res["weight_loading_share"] = round(res["model_loading_s"] / res["time_to_ready_s"], 3)
    return res


def wait_gpu_free(limit_s: float = 60.0) -> None:
    """The previous server's memory must be back before the next one profiles free memory."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        free, total = torch.cuda.mem_get_info()
        if free > 0.9 * total:
            return
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-ready"), help="local-disk folder (~17 GB, reused)")
    ap.add_argument("--budget-s", type=float, default=540, help="wall-clock budget; later engines are skipped")
    ap.add_argument("--compile", action="store_true",
                    help="vLLM's default torch.compile + CUDA graphs (default: --enforce-eager, so that neither "
                         "engine's time is a compile cache hit or miss)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="engine starts per loader, in ABBA order (default 2: each loader once first of a pair)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    budget = Budget(args.budget_s)

    def log(msg: str) -> None:
        print(f"[{args.budget_s - budget.left():5.0f} s] {msg}", flush=True)

    result: dict = {"kind": "load", "command": " ".join([sys.executable, *sys.argv]),
                    "utc": datetime.now(timezone.utc).isoformat(), "versions": versions(cpu=False),
                    "model": "Llama-3.1-8B shapes, FP8 per-tensor, dummy values", "eager": not args.compile}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_ready-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"

    def save() -> None:
        path.write_text(json.dumps(result, indent=1) + "\n")

    hf, out = args.dir / "hf-llama8b-fp8-dummy", args.dir / "shard-llama8b-fp8-dummy"
    if not hf.exists():
        t = time.perf_counter()
        write_hf_fp8_checkpoint(hf)
        result["write_hf_s"] = round(time.perf_counter() - t, 1)
    if not (out / "manifest.json").exists():
        result["shard_s"] = round(shard_child(hf, out, max(60.0, budget.left() - 150)), 1)
    log(f"checkpoints ready: {hf}, {out} {result}")
    save()
    extra = [] if args.compile else ["--enforce-eager"]
    loaders = {"gds_sharded": (out, "gds-sharded"), "default_loader": (hf, "auto")}
    # ABBA: the first engine on a fresh machine fills the Triton/CUDA caches that every later one reuses (seen
    # on the H100: init engine 20.6 s first, 2.8 s second), so each loader is started once in either position
    # and its faster start is the one compared; every start is kept under "starts".
    starts: dict[str, list[dict]] = {name: [] for name in loaders}
    order = [name for i in range(args.rounds) for name in (list(loaders) if i % 2 == 0 else list(loaders)[::-1])]
    for k, name in enumerate(order):
        model, fmt = loaders[name]

        def start(model: Path = model, fmt: str = fmt, name: str = name, k: int = k) -> dict:
            warm(sorted(model.rglob("*.safetensors")))
            wait_gpu_free()
            return serve_until_healthy(model, fmt, extra, args.dir / f"serve-{name}-{k}.log", budget.left() - 5)
        r = budget.run(60, start)
        starts[name].append({"position": k, **r})
        timed = [x for x in starts[name] if "time_to_ready_s" in x]
        result[name] = {**(min(timed, key=lambda x: x["time_to_ready_s"]) if timed else r), "starts": starts[name]}
        log(f"{name} (start {k}): ready in {r.get('time_to_ready_s')} s, model loading {r.get('model_loading_s')} s "
            f"({r.get('weight_loading_share')} of it), init engine {r.get('init_engine_s')} s "
            f"{str(r.get('error', r.get('skipped', '')))[:400]}")
        save()
    a, b = result.get("gds_sharded", {}), result.get("default_loader", {})
    if "time_to_ready_s" in a and "time_to_ready_s" in b:
        result["ready_saved_s"] = round(b["time_to_ready_s"] - a["time_to_ready_s"], 2)
        if "model_loading_s" in a and "model_loading_s" in b:
            result["model_loading_speedup"] = round(b["model_loading_s"] / a["model_loading_s"], 2)
    result["elapsed_s"] = round(args.budget_s - budget.left(), 1)
    save()
    log(f"wrote {path}: {json.dumps({k: result.get(k) for k in ('ready_saved_s', 'model_loading_speedup')})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
