"""The README demo, on the embedded real model (SmolLM2-135M-Instruct):

0. the model's TurboQuant calibration (``vllm-gds calibrate``, measured once, ~10 s on CPU, progress printed);
1. ``vllm-gds shard``: FP8-quantize and shard it for tensor parallelism 1 (cached after the first run);
2. ``vllm serve OUT --load-format gds-sharded --kv-cache-dtype turboquant``;
3. one real completion request; print the answer, the loader's per-rank line (mode, bytes, GB/s), the KV cache
   capacity vLLM reported and the TurboQuant bytes per token against bf16; stop the server.

Run through scripts/demo.sh, which does all set-up first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_gds_plugin.assets import cache_root, model_dir
from vllm_gds_plugin.kvcache.calibration import CALIBRATION_FILE
from vllm_gds_plugin.kvcache.presets import DEFAULT_PRESET, get_preset
from vllm_gds_plugin.loading.manifest import FORMAT_VERSION, Manifest, ManifestError
from vllm_gds_plugin.localserver import post_json, vllm_server

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
LOAD_LINE = re.compile(r"gds-sharded rank \S+: .*")
KV_LINE = re.compile(r"(?:GPU|CPU) KV cache size: ([\d,]+) tokens")


def shard(model: Path) -> Path:
    """The fp8 TP=1 output, made once; made again (``--overwrite``) when a kept one is of an older manifest
    format or unreadable, so the demo shows what this version writes."""
    out = cache_root() / "sharded" / f"{model.name}-fp8-tp1"
    if (out / "manifest.json").exists():
        try:
            version = Manifest.load(out).format_version
        except ManifestError as e:
            version, why = None, str(e)
        else:
            why = f"manifest format {version}, this version writes {FORMAT_VERSION}"
        if version == FORMAT_VERSION:
            print(f"[demo] using sharded output {out}")
            return out
        print(f"[demo] sharding again: {why}")
    cmd = [str(Path(sys.executable).with_name("vllm-gds")), "shard", str(model), str(out),
           "--tensor-parallel-size", "1", "--quantization", "fp8", "--overwrite"]
    print(f"[demo] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    # model_dir() fetches, converts and calibrates the model on first use: show its progress lines.
    progress = logging.StreamHandler(sys.stdout)
    progress.setFormatter(logging.Formatter("[demo] %(message)s"))
    logging.getLogger("vllm_gds_plugin.assets").addHandler(progress)
    logging.getLogger("vllm_gds_plugin.assets").setLevel(logging.INFO)
    model = model_dir()
    # The server finds it in OUT (the sharder copies it) or, for an older OUT, through the manifest's source.
    print(f"[demo] TurboQuant calibration: {model / CALIBRATION_FILE}")
    out = shard(model)
    serve_args = ["--load-format", "gds-sharded", "--kv-cache-dtype", "turboquant",
                  "--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        t0 = time.monotonic()
        print(f"[demo] vllm serve {out} {' '.join(serve_args)}", flush=True)
        with vllm_server(out, *serve_args, env={**CPU_ENV, **os.environ}, log_path=log) as base:
            ready = time.monotonic() - t0
            reply = post_json(base + "/v1/completions", {"model": str(out), "prompt": args.prompt,
                                                          "max_tokens": args.max_tokens, "temperature": 0})
        text = log.read_text(errors="replace")
    load = LOAD_LINE.search(text)
    kv = KV_LINE.search(text)
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    tq_bytes, bf16_bytes = get_preset(DEFAULT_PRESET).slot_bytes(head_dim), 4 * head_dim
    print(f"[demo] prompt: {args.prompt!r}")
    print(f"[demo] answer: {reply['choices'][0]['text']!r}")
    print(f"[demo] server ready in {ready:.1f} s")
    print(f"[demo] loader: {load.group(0) if load else 'no gds-sharded line in the server log'}")
    print(f"[demo] KV cache: {kv.group(1) + ' tokens' if kv else 'not reported'} with --kv-cache-dtype turboquant "
          f"({tq_bytes} bytes/token/KV head vs bf16 {bf16_bytes}: {bf16_bytes / tq_bytes:.2f}x the tokens)")
    return 0 if load and kv else 1


if __name__ == "__main__":
    sys.exit(main())
