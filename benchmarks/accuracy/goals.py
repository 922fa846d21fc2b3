"""The accuracy goals of issue 7 and their evaluation against one run's measurements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Maximum perplexity increase over bf16 KV, in percent, by average bits per K/V element.
PPL_DELTA_MAX_PCT = {4.0: 1.0, 3.5: 3.0, 3.0: 6.0}
TOP1_MIN = 0.97  # greedy top-1 agreement with bf16 KV, at 3.5 bits
TOP1_BITS = 3.5


def evaluate(configs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per (goal, configuration) that the goal applies to: value, threshold, pass, margin."""
    ref = next(c for c in configs if c["family"] == "reference")
    out: list[dict[str, Any]] = []
    for c in configs:
        if c["family"] == "reference":
            continue
        bits = c["avg_bits"]
        if bits in PPL_DELTA_MAX_PCT:
            out.append(_record("ppl_delta_pct", c, c.get("ppl_delta_pct"), PPL_DELTA_MAX_PCT[bits], upper=True))
        if bits == TOP1_BITS:
            out.append(_record("top1_agreement", c, c.get("top1_agreement"), TOP1_MIN, upper=False))
        if ref.get("needle") and "error" not in c:
            lost = [(n["context"], n["depth"]) for n, r in zip(c["needle"], ref["needle"])
                    if r["correct"] and not n["correct"]]
            out.append({"goal": "needle_equal_bf16", "config": c["label"], "value": c["needle_correct"],
                        "threshold": ref["needle_correct"], "pass": not lost, "lost_cases": lost})
    return out


def _record(goal: str, c: Mapping[str, Any], value: float | None, threshold: float, upper: bool) -> dict[str, Any]:
    if value is None:  # the configuration failed to run: the goal is not met, and the record says why
        return {"goal": goal, "config": c["label"], "value": None, "threshold": threshold, "pass": False,
                "error": c.get("error", "not measured")}
    margin = value - threshold if upper else threshold - value  # > 0: missed by this much
    return {"goal": goal, "config": c["label"], "value": value, "threshold": threshold, "pass": margin <= 0,
            "missed_by": max(margin, 0.0)}
