"""The README demo: serve the embedded real model through vLLM and answer one completion request.

Run through scripts/demo.sh (which does all set-up first). Prints the answer and the load/capacity figures
that `vllm serve` logged.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from vllm_gds_plugin.assets import model_dir
from vllm_gds_plugin.localserver import post_json, vllm_server

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
FIGURES = {  # what vLLM logs, and how we label it
    "weights loaded": re.compile(r"Loading weights took ([\d.]+) seconds"),
    "model load": re.compile(r"Model loading took ([\d.]+ GiB (?:memory )?and [\d.]+ seconds)"),
    "KV cache": re.compile(r"(?:GPU|CPU) KV cache size: ([\d,]+ tokens)"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    model = model_dir()
    serve_args = ["--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        t0 = time.monotonic()
        print(f"[demo] vllm serve {model} {' '.join(serve_args)}", flush=True)
        with vllm_server(model, *serve_args, env={**CPU_ENV, **os.environ}, log_path=log) as base:
            ready = time.monotonic() - t0
            reply = post_json(base + "/v1/completions", {"model": str(model), "prompt": args.prompt,
                                                          "max_tokens": args.max_tokens, "temperature": 0})
        text = log.read_text(errors="replace")
    print(f"[demo] prompt: {args.prompt!r}")
    print(f"[demo] answer: {reply['choices'][0]['text']!r}")
    print(f"[demo] server ready in {ready:.1f} s")
    for label, pattern in FIGURES.items():
        m = pattern.search(text)
        print(f"[demo] {label}: {m.group(1) if m else 'not reported'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
