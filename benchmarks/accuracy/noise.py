"""Seed-to-seed noise of our presets, and the CPU-vs-CUDA verdict measured against it.

The random rotation is the one free choice inside a TurboQuant preset (``{"turboquant": {"seed": N}}``): a
different seed gives a different, equally valid quantizer, and so a slightly different perplexity. That spread is
the quantization noise of the preset: ``python -m benchmarks.accuracy --seeds 0 1 2 3`` runs every preset once per
seed and records, per preset, the mean and the sample standard deviation (``sigma``) over seeds.

CPU (torch reference) and CUDA (Triton kernels) run the same quantizer for the same seed, but not on the same
keys and values: the model's bf16 GEMMs round differently on the two machines (bf16 KV itself differs by ~0.07%),
and every coordinate that sits near a codebook threshold takes the other code. So a CPU and a CUDA run of one seed
are partly independent draws of the quantization noise, and the seed spread is the yardstick (measured: the
same-seed CPU-vs-CUDA gaps change sign from preset to preset). The verdict, per preset: **within
noise** when at every seed both sides measured, ``|ppl_CUDA - ppl_CPU| <= NOISE_K * sigma``, with ``sigma`` the
preset's seed standard deviation (pooled as sqrt(mean of variances) over the sides that measured >= 2 seeds).
bf16 has no quantization noise; its CPU-vs-CUDA difference is shown as the floor set by the two attention backends.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.accuracy.configs import parse

NOISE_K = 2.0
# Per-run values summarised over seeds (mean and sample standard deviation).
SEED_METRICS = ("ppl", "ppl_delta_pct", "top1_agreement", "kl_mean")


def preset_and_seed(c: Mapping[str, Any]) -> tuple[str, int | None]:
    """From the label, so that results written before presets/seeds were recorded read the same way."""
    cfg = parse(c["label"])
    return cfg.preset, cfg.seed


def by_preset(configs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Records grouped by preset (seeds of one preset together), in first-seen order."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for c in configs:
        out.setdefault(preset_and_seed(c)[0], []).append(c)
    return out


def seed_stats(configs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per preset measured with >= 2 seeds (runs that failed are left out and counted): n, seeds, and
    ``<metric>_mean`` / ``<metric>_std`` for each of SEED_METRICS; the needle's worst seed."""
    out: dict[str, dict[str, Any]] = {}
    for preset, runs in by_preset(configs).items():
        ok = [c for c in runs if "error" not in c]
        if len(ok) < 2:
            continue
        rec: dict[str, Any] = {"n": len(ok), "seeds": [preset_and_seed(c)[1] for c in ok],
                               "failed": len(runs) - len(ok)}
        for m in SEED_METRICS:
            vals = [c[m] for c in ok if c.get(m) is not None]
            if len(vals) >= 2:
                rec[f"{m}_mean"] = statistics.fmean(vals)
                rec[f"{m}_std"] = statistics.stdev(vals)
        rec["needle_min"] = min(c["needle_correct"] for c in ok)
        out[preset] = rec
    return out


def comparable(cpu: Mapping[str, Any], cuda: Mapping[str, Any]) -> str | None:
    """None when the two runs measured the same thing (model, text, length, top-k), else why not."""
    keys = ("text", "tokens", "topk")
    diff = [f"{k} {cpu['settings'].get(k)} vs {cuda['settings'].get(k)}" for k in keys
            if cpu["settings"].get(k) != cuda["settings"].get(k)]
    if cpu["model"] != cuda["model"]:
        diff.insert(0, f"model {cpu['model']} vs {cuda['model']}")
    return "; ".join(diff) or None


def cpu_vs_cuda(cpu: Mapping[str, Any], cuda: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per preset the CPU run measured: the seeds both sides ran, the worst |CUDA - CPU| perplexity
    difference over them, sigma, and the verdict (see the module docstring)."""
    cpu_stats, cuda_stats = seed_stats(cpu["configs"]), seed_stats(cuda["configs"])
    cuda_runs = by_preset([c for c in cuda["configs"] if "error" not in c])
    out = []
    for preset, runs in by_preset([c for c in cpu["configs"] if "error" not in c]).items():
        mine = {preset_and_seed(c)[1]: c for c in runs}
        theirs = {preset_and_seed(c)[1]: c for c in cuda_runs.get(preset, [])}
        shared = sorted(set(mine) & set(theirs), key=lambda s: -1 if s is None else s)
        variances = [s[preset]["ppl_std"] ** 2 for s in (cpu_stats, cuda_stats) if "ppl_std" in s.get(preset, {})]
        sigma = math.sqrt(statistics.fmean(variances)) if variances else None
        rec: dict[str, Any] = {"preset": preset, "family": runs[0]["family"], "seeds": shared, "sigma": sigma,
                               "cpu_ppl": statistics.fmean(mine[s]["ppl"] for s in shared) if shared else None,
                               "cuda_ppl": statistics.fmean(theirs[s]["ppl"] for s in shared) if shared else None}
        if not shared:
            rec.update(verdict="pending", note="not run on CUDA with these seeds")
            out.append(rec)
            continue
        diffs = [theirs[s]["ppl"] - mine[s]["ppl"] for s in shared]
        worst = max(diffs, key=abs)
        rec.update(worst_diff=worst, worst_diff_pct=100 * worst / mine[shared[diffs.index(worst)]]["ppl"],
                   mean_diff=statistics.fmean(diffs))
        if rec["family"] == "reference":
            rec["verdict"] = "reference (no quantization noise)"
        elif sigma is None:
            rec["verdict"] = "no noise measure (< 2 seeds on either side)"
        else:
            rec["verdict"] = "within noise" if abs(worst) <= NOISE_K * sigma else "OUTSIDE noise"
            rec["worst_in_sigma"] = abs(worst) / sigma
        out.append(rec)
    return out
