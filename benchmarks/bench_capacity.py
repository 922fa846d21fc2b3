"""Check ``vllm-gds capacity`` against the KV-cache size vLLM itself reports, on the GPU it runs on.

For each case, one fresh ``LLM(...)`` (dummy weights, so only the config matters) is built in a subprocess and
the "GPU KV cache size: N tokens" line of vLLM's log is compared with the planner's prediction for the same
GPU, utilization, batch limits and KV dtype. Cases vary what the planner models: KV dtype, utilization,
``max_num_batched_tokens`` (the activation term), and a second model shape (SmolLM2: tied embeddings, 3 KV heads,
head_dim 64). Results: benchmarks/results/bench_capacity-<utc>.json (kind ``capacity_check``).

    python benchmarks/bench_capacity.py [--native]   # --native adds vLLM's turboquant_* (needs FlashAttention 2)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from vllm_gds_plugin import capacity as cap
from vllm_gds_plugin.capacity_commands import selected_row_name

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py, also under python -P
from machine import smi, smi_int  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B = ROOT / "benchmarks" / "public_configs" / "llama-3.1-8b.json"
KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")  # "GPU KV cache size: 444,528 tokens"
MAX_MODEL_LEN = 131072

# (label, model config, kv_cache_dtype, gpu_memory_utilization, max_num_batched_tokens)
CASES = [
    ("8b-auto", "llama8b", "auto", 0.9, 16384),
    ("8b-fp8", "llama8b", "fp8", 0.9, 16384),
    ("8b-turboquant", "llama8b", "turboquant", 0.9, 16384),
    ("8b-turboquant-3bit", "llama8b", "turboquant:3bit", 0.9, 16384),
    ("8b-auto-util0.8", "llama8b", "auto", 0.8, 16384),
    ("8b-auto-mbt8192", "llama8b", "auto", 0.9, 8192),
    ("smollm2-auto", "smollm2", "auto", 0.9, 16384),
    ("smollm2-turboquant", "smollm2", "turboquant", 0.9, 16384),
]
NATIVE_CASES = [("8b-turboquant_4bit_nc", "llama8b", "turboquant_4bit_nc", 0.9, 16384),
                ("8b-turboquant_3bit_nc", "llama8b", "turboquant_3bit_nc", 0.9, 16384)]

ENGINE = """
import json, sys
from vllm import LLM
kw = json.loads(sys.argv[1])
LLM(**kw)
"""


def model_folder(name: str, tmp: Path) -> Path:
    if name == "smollm2":
        from vllm_gds_plugin.assets import model_dir

        return model_dir()
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(LLAMA_8B.read_text())
    return folder


def measure(folder: Path, kv: str, util: float, mbt: int) -> tuple[int | None, str]:
    dtype, _, preset = kv.partition(":")
    kw = dict(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              kv_cache_dtype=dtype, gpu_memory_utilization=util, max_num_batched_tokens=mbt,
              max_model_len=min(MAX_MODEL_LEN, cap.load_shape(folder).max_position_embeddings),
              enable_prefix_caching=False)
    if preset:
        kw["additional_config"] = {"turboquant": {"preset": preset}}
    # From /tmp: `-c` puts the working directory on sys.path; the repo's vllm_gds_plugin/ lacks kernels/.
    proc = subprocess.run([sys.executable, "-c", ENGINE, json.dumps(kw)], capture_output=True, text=True, cwd="/tmp")
    found = KV_LINE.findall(proc.stdout + proc.stderr)
    tail = "" if found else (proc.stdout + proc.stderr)[-1500:]
    return (int(found[-1].replace(",", "")) if found else None), tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--native", action="store_true", help="also vLLM's native turboquant_* presets")
    args = ap.parse_args()
    total_mib = smi_int("memory.total")
    if total_mib is None:
        print("bench_capacity needs a CUDA GPU (nvidia-smi)", file=sys.stderr)
        return 2
    import torch
    import vllm

    total = total_mib * cap.MiB
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, kv, util, mbt in CASES + (NATIVE_CASES if args.native else []):
            folder = model_folder(model, Path(tmp))
            shape = cap.load_shape(folder)
            plan = cap.plan(shape, cap.PlanRequest(gpu_memory_bytes=total, gpu_memory_utilization=util,
                                                   max_num_batched_tokens=mbt))
            predicted = plan.row(selected_row_name(kv)).tokens
            measured, tail = measure(folder, kv, util, mbt)
            row = {"label": label, "model": model, "kv_cache_dtype": kv, "gpu_memory_utilization": util,
                   "max_num_batched_tokens": mbt, "measured_tokens": measured, "predicted_tokens": predicted,
                   "error_pct": None if not measured else round(100 * (predicted / measured - 1), 3)}
            if tail:
                row["engine_log_tail"] = tail
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "engine_log_tail"}), flush=True)
    result = {"kind": "capacity_check", "command": " ".join([sys.executable, *sys.argv]),
              "utc": datetime.now(timezone.utc).isoformat(), "device": smi("name"),
              "driver": smi("driver_version"), "vllm": vllm.__version__, "torch": torch.__version__,
              "gpu_total_bytes": total, "rows": rows}
    out = ROOT / "benchmarks" / "results" / f"bench_capacity-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    worst = max((abs(r["error_pct"]) for r in rows if r["error_pct"] is not None), default=None)
    print(f"wrote {out}; worst |error| {worst}% over {sum(r['error_pct'] is not None for r in rows)} case(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
