"""Where the key error comes from, per layer: perplexity of the HF proxy (variants.py) with K quantized in ONE
layer only (V and every other layer bf16), the engine's calibration on, seed 0.

    python -m benchmarks.accuracy.layer_sensitivity [--model smollm2] [--tokens 2000] [--preset 4bit]

Writes benchmarks/results/experiments/layer_sensitivity_<model>_<preset>_<tokens>tok.json. A loss concentrated
in a few layers would point at more bits there; spread evenly, it would not.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.accuracy.run import RESULTS
from benchmarks.accuracy.variants import Variant, measure_variants, proxy_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.layer_sensitivity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--preset", default="4bit")
    args = ap.parse_args(argv)
    name, path, model, ids = proxy_model(args.model, args.tokens)
    n = model.config.num_hidden_layers
    chosen = [Variant(f"K {args.preset} in layer {i} only", "one layer's keys", args.preset, quant_v=False,
                      calibrated=True, only_layer=i) for i in range(n)]
    base, rows = measure_variants(path, model, ids, chosen)
    out = RESULTS / "experiments" / f"layer_sensitivity_{name}_{args.preset}_{ids.shape[1]}tok.json"
    out.write_text(json.dumps({"kind": "accuracy_layer_sensitivity", "model": name, "tokens": int(ids.shape[1]),
                               "bf16_ppl": base, "command": " ".join(
                                   ["python -m benchmarks.accuracy.layer_sensitivity", *sys.argv[1:]]),
                               "rows": rows}, indent=1) + "\n")
    top = sorted(rows, key=lambda r: -r["ppl_delta_pct"])[:6]
    print("largest:", ", ".join(f"{r['variant']} {r['ppl_delta_pct']:+.2f}%" for r in top))
    print(f"sum of the per-layer deltas {sum(r['ppl_delta_pct'] for r in rows):+.2f}%; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
