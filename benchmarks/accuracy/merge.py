"""Combine accuracy results of several calls on one machine into one file.

    python -m benchmarks.accuracy.merge --out benchmarks/results/accuracy_<model>_cuda.json A.json B.json ...

A time-limited machine (the H100: 10 minutes per call, ~40-60 s per engine start) cannot run bf16, every preset,
every seed and vLLM's native dtypes in one call; each call runs bf16 first (its own reference) and a share of the
rest. The calls must have measured the same thing (model, device, text, length, needles, top-k, prefill chunk,
calibration) or the merge refuses. A configuration measured by several calls keeps the last call's record; every
record keeps its own call's Δ vs bf16 (bf16 is deterministic on one machine: the merge checks that the calls' bf16
perplexities agree and records them). Goals and seed statistics are recomputed over the merged records.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.accuracy import goals, noise

# Settings that may differ between merged calls: the list of seeds (unioned) and the engine length (a call with a
# longer needle set starts with a longer max_model_len, which does not change what is measured).
FREE_SETTINGS = {"seeds", "max_model_len"}
# Calls' bf16 perplexities may differ by this much (relative) before the merge refuses: same machine, same inputs.
BF16_RTOL = 1e-3


class MergeError(ValueError):
    """The results files cannot be merged (different measurements); the message names the file and the field."""


def _same(a: Mapping[str, Any], b: Mapping[str, Any], where: str) -> None:
    for key in ("model", "device", "path", "vllm"):
        if a.get(key) != b.get(key):
            raise MergeError(f"{where}: {key} {b.get(key)!r} differs from the first file's {a.get(key)!r}")
    sa, sb = a["settings"], b["settings"]
    for key in sorted((set(sa) | set(sb)) - FREE_SETTINGS):
        if sa.get(key) != sb.get(key):
            raise MergeError(f"{where}: settings.{key} {sb.get(key)!r} differs from the first file's {sa.get(key)!r}")


def merge(docs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """(name, results document) pairs, in call order -> one results document."""
    if not docs:
        raise MergeError("nothing to merge")
    first_name, first = docs[0]
    configs: dict[str, dict[str, Any]] = {}
    calls, bf16 = [], []
    for name, doc in docs:
        if doc.get("kind") != "accuracy" or "configs" not in doc:
            raise MergeError(f"{name}: not an accuracy results file (kind {doc.get('kind')!r})")
        _same(first, doc, name)
        for c in doc["configs"]:
            configs[c["label"]] = dict(c)
            if c["family"] == "reference" and "ppl" in c:
                bf16.append(c["ppl"])
        calls.extend(doc.get("calls") or [{"file": name, "command": doc["command"], "utc": doc["utc"],
                                           "labels": [c["label"] for c in doc["configs"]],
                                           "complete": doc.get("complete", True)}])
    if bf16 and (max(bf16) - min(bf16)) > BF16_RTOL * min(bf16):
        raise MergeError(f"bf16 perplexities of the calls differ beyond {BF16_RTOL:g} relative: {bf16}")
    ordered = sorted(configs.values(), key=lambda c: c["family"] != "reference")  # bf16 first, else call order
    seeds = sorted({s for _, d in docs for s in d["settings"].get("seeds") or []})
    out = {k: v for k, v in first.items() if k not in ("configs", "goals", "seed_stats", "rows", "calls")}
    out.update(command=" + ".join(c["command"] for c in calls), utc=docs[-1][1]["utc"],
               settings={**first["settings"], "seeds": seeds or None,
                         "max_model_len": max(d["settings"]["max_model_len"] for _, d in docs)},
               calls=calls, bf16_ppl_per_call=bf16, configs=ordered, complete=all(c["complete"] for c in calls),
               goals=goals.evaluate(ordered), seed_stats=noise.seed_stats(ordered),
               rows=[{"model": first["model"], "kv_cache_dtype": c["label"], "ppl": c["ppl"],
                      "delta_pct": c["ppl_delta_pct"], "tokens": first["settings"]["tokens"]}
                     for c in ordered if "ppl_delta_pct" in c])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="+", help="results of the calls, in the order they ran")
    ap.add_argument("--out", type=Path, required=True, help="merged results (may be one of the inputs)")
    args = ap.parse_args(argv)
    docs = [(str(p), json.loads(p.read_text())) for p in args.files]
    merged = merge(docs)
    args.out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {args.out}: {len(merged['configs'])} configurations from {len(merged['calls'])} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
