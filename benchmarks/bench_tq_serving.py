"""KV capacity, decode TPOT and long prefill per KV cache dtype on a Llama-3.1-8B-shaped model (issue 6).

Each KV dtype runs in its own ``LLM`` subprocess (dummy weights, tokenizer skipped, gpu_memory_utilization 0.9,
max_model_len 131072, CUDA graphs on, prefix caching off) and reports:
- ``kv_tokens``: the "GPU KV cache size: N tokens" vLLM logs;
- ``tpot_ms``: decode time per output token for ``bs32@4K`` (32 requests, 4096-token prompts) and ``bs8@32K``
  (8 x 32768), measured as [time(prompt + 1 + G tokens) - time(prompt + 1 token)] / G, i.e. the extra time of G
  decode steps of the full batch over the same prefill (G = --decode-tokens);
- ``prefill_s``: ``8x32K``, the wall time to prefill 8 x 32768-token prompts (the bs8@32K 1-token run).

    python benchmarks/bench_tq_serving.py                     # every KV dtype (native ones need FA2)
    python benchmarks/bench_tq_serving.py --kv auto fp8       # a subset, e.g. to split across calls
    python benchmarks/bench_tq_serving.py --list

Writes benchmarks/results/kv_serving-<label>-<utc>.json per dtype (kind ``kv_serving``; copied to $OUT if set).
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
from bench_capacity import KV_LINE, MAX_MODEL_LEN, ROOT, model_folder, smi  # noqa: E402

# label -> (kv_cache_dtype, turboquant preset or None, extra environment)
KV_CASES: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "bf16": ("auto", None, {}),
    "fp8": ("fp8", None, {}),
    "tq-default": ("turboquant", None, {}),  # our ~3.5-bit default (k4v3)
    "tq-3.5bit": ("turboquant", "3.5bit", {}),
    "tq-3bit": ("turboquant", "3bit", {}),
    "tq-4bit": ("turboquant", "4bit", {}),
    # vLLM's native TurboQuant needs FlashAttention 2 on 0.26 (it refuses FA3); present with --with-fa2 bundles.
    "native-4bit": ("turboquant_4bit_nc", None, {"VLLM_FLASH_ATTN_VERSION": "2"}),
    "native-3bit": ("turboquant_3bit_nc", None, {"VLLM_FLASH_ATTN_VERSION": "2"}),
}
WORKLOADS = {"bs32@4K": (32, 4096), "bs8@32K": (8, 32768)}
PREFILL_LABEL = "8x32K"  # the bs8@32K prefill-only run
RESULT_TAG = "BENCH_RESULT "

CHILD = r"""
import json, random, sys, time
from vllm import LLM, SamplingParams, TokensPrompt

cfg = json.loads(sys.argv[1])
llm = LLM(**cfg["engine"])
rng = random.Random(0)

def prompts(n, length):
    return [TokensPrompt(prompt_token_ids=[rng.randrange(1000, cfg["vocab_size"]) for _ in range(length)]) for _ in range(n)]

def run(batch, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
    t = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return time.perf_counter() - t

run(prompts(4, 2048), 16)  # Triton JIT and allocator warm-up, not timed
g = cfg["decode_tokens"]
res = {"tpot_ms": {}, "prefill_s": {}}
for label, (n, length) in cfg["workloads"].items():
    t1 = run(prompts(n, length), 1)
    tg = run(prompts(n, length), 1 + g)  # fresh random prompts: nothing to reuse even if caching were on
    # A difference of two runs: when prefill time varies more than G decode steps take, it is noise (None).
    res["tpot_ms"][label] = round(1000 * (tg - t1) / g, 3) if tg > t1 else None
    res["prefill_s"][label] = round(t1, 3)
print("BENCH_RESULT " + json.dumps(res), flush=True)
"""


def run_case(label: str, folder: Path, decode_tokens: int, timeout: float) -> dict[str, Any]:
    kv, preset, env = KV_CASES[label]
    engine: dict[str, Any] = dict(model=str(folder), load_format="dummy", skip_tokenizer_init=True,
                                  dtype="bfloat16", kv_cache_dtype=kv, gpu_memory_utilization=0.9,
                                  max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False,
                                  disable_log_stats=True)
    if preset:
        engine["additional_config"] = {"turboquant": {"preset": preset}}
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    cfg = {"engine": engine, "decode_tokens": decode_tokens, "workloads": WORKLOADS, "vocab_size": vocab_size}
    row: dict[str, Any] = {"label": label, "kv_cache_dtype": kv if not preset else f"{kv}:{preset}"}
    t0 = time.monotonic()
    # Own process group: on a timeout the engine-core grandchild must die too, or it keeps the GPU memory and
    # every later KV dtype fails to start.
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env}, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        rc: Any = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        rc = "timeout"
    row["wall_s"] = round(time.monotonic() - t0, 1)
    found = KV_LINE.findall(log)
    row["kv_tokens"] = int(found[-1].replace(",", "")) if found else None
    results = [line[len(RESULT_TAG):] for line in log.splitlines() if line.startswith(RESULT_TAG)]
    if results:
        measured = json.loads(results[-1])
        row["tpot_ms"] = measured["tpot_ms"]
        row["prefill_s"] = {PREFILL_LABEL: measured["prefill_s"]["bs8@32K"]}
        row["prefill_s_all"] = measured["prefill_s"]
    else:
        row["error"] = f"exit {rc}"
        row["engine_log_tail"] = log[-3000:]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", nargs="*", default=list(KV_CASES), choices=list(KV_CASES), metavar="LABEL",
                    help=f"KV dtypes to run (default: all): {', '.join(KV_CASES)}")
    ap.add_argument("--decode-tokens", type=int, default=64, help="G, decode steps timed per workload")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per KV dtype subprocess")
    ap.add_argument("--list", action="store_true", help="print the KV dtype labels and exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(f"{k}: {v[0]}{':' + v[1] if v[1] else ''}" for k, v in KV_CASES.items()))
        return 0
    if not smi("memory.total").isdigit():
        print("bench_tq_serving needs a CUDA GPU (nvidia-smi)", file=sys.stderr)
        return 2
    import torch
    import triton
    import vllm

    env = {"command": " ".join([sys.executable, *sys.argv]), "device": smi("name"),
           "driver": smi("driver_version"), "vllm": vllm.__version__, "torch": torch.__version__,
           "triton": triton.__version__}
    out_dirs = [ROOT / "benchmarks" / "results"] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder("llama8b", Path(tmp))
        for label in args.kv:
            row = run_case(label, folder, args.decode_tokens, args.timeout)
            print(json.dumps({k: v for k, v in row.items() if k != "engine_log_tail"}), flush=True)
            utc = datetime.now(timezone.utc)
            result = {"kind": "kv_serving", "model": "llama-3.1-8b (dummy weights)", "utc": utc.isoformat(),
                      "max_model_len": MAX_MODEL_LEN, "gpu_memory_utilization": 0.9, "cuda_graphs": True,
                      "prefix_caching": False, "decode_tokens": args.decode_tokens, **env, "rows": [row]}
            name = f"kv_serving-{label}-{utc:%Y%m%dT%H%M%SZ}.json"
            for d in out_dirs:
                d.mkdir(parents=True, exist_ok=True)
                (d / name).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
