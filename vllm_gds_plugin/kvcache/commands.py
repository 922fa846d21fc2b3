"""``vllm-gds calibrate MODEL_DIR``: write the model's TurboQuant calibration next to its weights."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vllm_gds_plugin.kvcache.calibration import CALIBRATION_FILE


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure TurboQuant KV centering for a model (writes "
                                         f"{CALIBRATION_FILE} into the model folder)")
    p.add_argument("model_dir", type=Path, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens (default 4096)")
    p.add_argument("--window", type=int, default=None, help="tokens per sequence (default 512)")
    p.add_argument("--text", type=Path, default=None,
                   help="UTF-8 text file to calibrate on (default: real English news, lee_background)")
    p.add_argument("--output", type=Path, default=None, help=f"default: MODEL_DIR/{CALIBRATION_FILE}")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from vllm_gds_plugin.kvcache.calibrate import (
        DEFAULT_TOKENS,
        DEFAULT_WINDOW,
        calibrate,
        default_token_ids,
        text_token_ids,
    )

    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"vllm-gds calibrate: {args.model_dir} is not a model folder (no config.json)")
    tokens = args.tokens or DEFAULT_TOKENS
    if args.text is not None:
        ids, source = text_token_ids(args.model_dir, args.text, tokens)
    else:
        ids, source = default_token_ids(args.model_dir, tokens)
    t0 = time.time()
    cal = calibrate(args.model_dir, ids, window=args.window or DEFAULT_WINDOW, source=source)
    out = args.output or args.model_dir / CALIBRATION_FILE
    cal.save(out)
    layers, heads, dim = cal.shape
    print(f"wrote {out}: {layers} layers x {heads} KV heads x {dim}, {cal.tokens} tokens of {source} "
          f"[{time.time() - t0:.0f} s]")
    return 0
