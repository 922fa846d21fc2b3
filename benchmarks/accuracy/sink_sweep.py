"""Is keeping the attention sink exact worth building? Perplexity of the HF proxy (variants.py: every layer's
post-RoPE K/V through the torch reference quantizer, the engine's calibration on) with the first 0, 1 or 16
tokens' K/V kept in bf16, per preset and rotation seed, on the lee_background text.

    python -m benchmarks.accuracy.sink_sweep [--model smollm2] [--tokens 4000] [--seeds 0 1 2]

Writes benchmarks/results/experiments/sink_sweep_<model>_<tokens>tok.json. Not in the engine: the paged cache
has no room for an unquantized token (docs/turboquant.md, "What is left").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from benchmarks.accuracy.run import RESULTS
from benchmarks.accuracy.variants import Variant, measure_variants, proxy_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.sink_sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--presets", nargs="+", default=["4bit", "turboquant", "3bit"])
    ap.add_argument("--exact-first", type=int, nargs="+", default=[0, 1, 16])
    args = ap.parse_args(argv)
    name, path, model, ids = proxy_model(args.model, args.tokens)
    chosen = [Variant(f"{p} seed {seed} first {n} exact", "attention sink kept exact", p, seed=seed, calibrated=True,
                      exact_first=n) for p in args.presets for seed in args.seeds for n in args.exact_first]
    base, rows = measure_variants(path, model, ids, chosen)
    for v, r in zip(chosen, rows):
        r |= {"seed": v.seed, "exact_first": v.exact_first}
    summary = {}
    for p in args.presets:
        for n in args.exact_first:
            d = [r["ppl_delta_pct"] for r in rows if r["preset"] == p and r["exact_first"] == n]
            summary[f"{p} first {n} exact"] = s = {"mean_pct": statistics.mean(d),
                                                   "std_pct": statistics.stdev(d) if len(d) > 1 else 0.0}
            print(f"{p:>10} first {n:2d} exact: {s['mean_pct']:+.2f} ± {s['std_pct']:.2f}% over seeds {args.seeds}")
    out = RESULTS / "experiments" / f"sink_sweep_{name}_{ids.shape[1]}tok.json"
    out.write_text(json.dumps({"kind": "accuracy_sink_sweep", "model": name, "tokens": int(ids.shape[1]),
                               "bf16_ppl": base, "command": " ".join(["python -m benchmarks.accuracy.sink_sweep",
                                                                       *sys.argv[1:]]),
                               "torch": torch.__version__, "rows": rows, "summary": summary}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
