"""The accuracy goals of issue 7 and their evaluation against one run's measurements."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.accuracy.noise import by_preset

# Maximum perplexity increase over bf16 KV, in percent, by average bits per K/V element.
PPL_DELTA_MAX_PCT = {4.0: 1.0, 3.5: 3.0, 3.0: 6.0}
TOP1_MIN = 0.97  # greedy top-1 agreement with bf16 KV, at 3.5 bits
TOP1_BITS = 3.5


def evaluate(configs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per (goal, preset) that the goal applies to: value, threshold, pass, margin. A preset run with
    several rotation seeds is judged on its mean over seeds (what a user gets, on average, from any seed; the
    record keeps the seeds' standard deviation) and, for the needle, on its worst seed."""
    ref = next(c for c in configs if c["family"] == "reference")
    out: list[dict[str, Any]] = []
    for preset, runs in by_preset(configs).items():
        c = runs[0]
        if c["family"] == "reference":
            continue
        label = c["label"] if len(runs) == 1 else preset
        failed = next((r for r in runs if "error" in r), None)
        bits = c["avg_bits"]
        if bits in PPL_DELTA_MAX_PCT:
            out.append(_record("ppl_delta_pct", label, runs, failed, PPL_DELTA_MAX_PCT[bits], upper=True))
        if bits == TOP1_BITS:
            out.append(_record("top1_agreement", label, runs, failed, TOP1_MIN, upper=False))
        if ref.get("needle") and failed is None:
            lost = sorted({(n["context"], n["depth"]) for r in runs for n, b in zip(r["needle"], ref["needle"])
                           if b["correct"] and not n["correct"]})
            out.append({"goal": "needle_equal_bf16", "config": label, "value": min(r["needle_correct"] for r in runs),
                        "threshold": ref["needle_correct"], "pass": not lost, "lost_cases": lost,
                        "seeds": len(runs)})
    return out


def _record(goal: str, label: str, runs: Sequence[Mapping[str, Any]], failed: Mapping[str, Any] | None,
            threshold: float, upper: bool) -> dict[str, Any]:
    if failed is not None:  # a run failed: the goal is not met, and the record says why
        return {"goal": goal, "config": label, "value": None, "threshold": threshold, "pass": False,
                "error": failed.get("error", "not measured"), "seeds": len(runs)}
    vals = [r[goal] for r in runs]
    value = statistics.fmean(vals)
    margin = value - threshold if upper else threshold - value  # > 0: missed by this much
    return {"goal": goal, "config": label, "value": value, "threshold": threshold, "pass": margin <= 0,
            "missed_by": max(margin, 0.0), "seeds": len(runs), "std": statistics.stdev(vals) if len(vals) > 1 else None}
