"""Fast subset of the accuracy harness (benchmarks/accuracy): SmolLM2, bf16 vs the default TurboQuant preset.

Real vLLM engines on the real model and real text, ~1000 tokens of perplexity and one needle; the goals
(benchmarks/accuracy/goals.py) are evaluated and printed, the asserted thresholds are regression bounds (below). The full matrix is a benchmark: ``python -m benchmarks.accuracy``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not an installed package

from benchmarks.accuracy import configs, goals, merge, metrics, noise, report  # noqa: E402
from benchmarks.accuracy import run as acc  # noqa: E402
from benchmarks.accuracy.needle import build_cases  # noqa: E402

PPL_TOKENS = 1000
NEEDLE_CONTEXTS = [800]
NEEDLE_DEPTHS = [0.5]
CONFIGS = ["bf16", "turboquant"]


@pytest.fixture(scope="module")
def run_doc(model_path: Path, lee_text: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ppl_ids = tok.encode(lee_text)[:PPL_TOKENS]
    cases = build_cases(lambda s: tok.encode(s, add_special_tokens=False), lee_text, NEEDLE_CONTEXTS, NEEDLE_DEPTHS)
    max_len = max([len(ppl_ids), *(len(c.prompt_ids) for c in cases)]) + 16
    configs = acc.run_all(CONFIGS, model_path, ppl_ids, cases, max_len)
    return {"kind": "accuracy", "model": "smollm2-135m-instruct", "device": "CPU (test)",
            "path": "torch reference (CPU)", "vllm": "test", "torch": "test", "utc": "test", "command": "pytest",
            "settings": {"text": "lee_background", "tokens": len(ppl_ids), "topk": acc.TOPK,
                         "needle_contexts": NEEDLE_CONTEXTS, "needle_depths": NEEDLE_DEPTHS},
            "configs": configs, "goals": goals.evaluate(configs)}


def _goal(doc: dict[str, Any], goal: str) -> dict[str, Any]:
    [g] = [g for g in doc["goals"] if g["goal"] == goal and g["config"] == "turboquant"]
    return g


@pytest.mark.slow
def test_reference_is_sane(run_doc: dict[str, Any]) -> None:
    bf16 = run_doc["configs"][0]
    # SmolLM2-135M on lee_background: ~28 over the first 1000 tokens (28.05 over 4000, see the foundation issue).
    assert 20 < bf16["ppl"] < 40, bf16["ppl"]
    assert bf16["needle_correct"] == 1, bf16["needle"]  # the needle format is one the model solves in bf16


# The issue 7 goals for the default preset (+3% perplexity, >= 97% top-1) are NOT met yet: measured here with the
# model's calibration (key centering) +6.98% and 86.89% (1000 tokens; uncalibrated before: +11.40%, 84.48%) on an
# Intel box with AMX, +8.55% on an AMD EPYC box (bf16 rounding of the CPU kernels and the machine's own calibration
# file differ). The harness reports pass/fail against the goals (goals.evaluate); these tests guard against
# regressions, with bounds a little beyond the measurements.
PPL_DELTA_REGRESSION_BOUND_PCT = 9.5
TOP1_REGRESSION_BOUND = 0.85


@pytest.mark.slow
def test_default_preset_perplexity_regression_bound(run_doc: dict[str, Any]) -> None:
    g = _goal(run_doc, "ppl_delta_pct")
    assert g["threshold"] == goals.PPL_DELTA_MAX_PCT[3.5]
    print(f"perplexity +{g['value']:.2f}% over bf16 KV (goal <= +{g['threshold']}%, pass={g['pass']})")
    assert g["value"] <= PPL_DELTA_REGRESSION_BOUND_PCT, f"regression (goal: <= +{g['threshold']}%): {g}"


@pytest.mark.slow
def test_default_preset_top1_regression_bound(run_doc: dict[str, Any]) -> None:
    g = _goal(run_doc, "top1_agreement")
    print(f"top-1 agreement {g['value']:.2%} with bf16 KV (goal >= {g['threshold']:.0%}, pass={g['pass']})")
    assert g["value"] >= TOP1_REGRESSION_BOUND, f"regression (goal: >= {g['threshold']:.0%}): {g}"


@pytest.mark.slow
def test_default_preset_needle_equal_bf16(run_doc: dict[str, Any]) -> None:
    g = _goal(run_doc, "needle_equal_bf16")
    assert g["pass"], g


@pytest.mark.slow
def test_docs_render_the_measured_numbers(run_doc: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "accuracy_smollm2-135m-instruct_cpu.json").write_text(json.dumps(run_doc))
    page = report.render(tmp_path)
    tq = run_doc["configs"][1]
    assert f"| turboquant | {tq['kv_bits']} | {tq['ppl']:.3f} | {tq['ppl_delta_pct']:+.2f} |" in page


@pytest.mark.slow
def test_calls_merge_into_one_result(run_doc: dict[str, Any], tmp_path: Path) -> None:
    """Two calls (bf16 + ours, bf16 alone) of the same measurement merge into one file with recomputed goals;
    a call that measured something else (another text length) is refused, naming the file and the setting."""
    bf16_only = {**run_doc, "configs": run_doc["configs"][:1], "command": "call B", "utc": "later"}
    files = []
    for name, doc in (("a.json", run_doc), ("b.json", bf16_only)):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps({**doc, "settings": {**doc["settings"], "max_model_len": 1016}}))
    out = tmp_path / "merged.json"
    assert merge.main([*map(str, files), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [c["label"] for c in merged["configs"]] == CONFIGS
    assert merged["goals"] == json.loads(json.dumps(goals.evaluate(run_doc["configs"])))
    assert [c["command"] for c in merged["calls"]] == ["pytest", "call B"]
    other = {**bf16_only, "settings": {**bf16_only["settings"], "tokens": 500}}
    with pytest.raises(merge.MergeError, match=r"b\.json: settings\.tokens 500"):
        merge.merge([("a.json", run_doc), ("b.json", other)])


def _seeded(preset: str, ppls: dict[int, float]) -> list[dict[str, Any]]:
    cfg = configs.parse(preset)
    return [{"label": f"{preset}@{s}", "family": "ours", "avg_bits": cfg.avg_bits, "ppl": v, "ppl_delta_pct": v - 100,
             "top1_agreement": 0.9, "kl_mean": 0.01, "needle_correct": 1, "needle": []} for s, v in ppls.items()]


def test_seed_noise_and_cpu_vs_cuda_verdict() -> None:
    """The arithmetic of noise.py on known numbers: sigma is the seeds' sample standard deviation (pooled over the
    two sides), and a preset is within noise when every shared seed differs by at most NOISE_K * sigma."""
    bf16 = {"label": "bf16", "family": "reference", "avg_bits": 16.0, "ppl": 100.0, "needle_correct": 1, "needle": []}
    settings = {"text": "t", "tokens": 10, "topk": 20}
    cpu = {"model": "m", "settings": settings,
           "configs": [bf16, *_seeded("4bit", {0: 101.0, 1: 103.0, 2: 102.0}), *_seeded("3bit", {0: 104.0, 1: 106.0})]}
    cuda = {"model": "m", "settings": settings,
            "configs": [{**bf16, "ppl": 100.1}, *_seeded("4bit", {0: 101.5, 1: 102.4, 2: 102.4}),
                        *_seeded("3bit", {0: 110.0})]}
    stats = noise.seed_stats(cpu["configs"])
    assert stats["4bit"]["ppl_mean"] == pytest.approx(102.0) and stats["4bit"]["ppl_std"] == pytest.approx(1.0)
    assert stats["3bit"]["seeds"] == [0, 1] and stats["3bit"]["ppl_std"] == pytest.approx(math.sqrt(2))
    [g] = [g for g in goals.evaluate(cpu["configs"]) if g["config"] == "4bit" and g["goal"] == "ppl_delta_pct"]
    assert g["value"] == pytest.approx(2.0) and g["std"] == pytest.approx(1.0) and g["seeds"] == 3
    verdicts = {r["preset"]: r for r in noise.cpu_vs_cuda(cpu, cuda)}
    assert verdicts["bf16"]["verdict"].startswith("reference")
    cuda_std = noise.seed_stats(cuda["configs"])["4bit"]["ppl_std"]
    assert verdicts["4bit"]["sigma"] == pytest.approx(math.sqrt((1.0 + cuda_std ** 2) / 2))
    assert verdicts["4bit"]["worst_diff"] == pytest.approx(-0.6) and verdicts["4bit"]["verdict"] == "within noise"
    # 3bit: CUDA ran seed 0 only; 6.0 apart with sigma sqrt(2) from the CPU's two seeds: outside.
    assert verdicts["3bit"]["seeds"] == [0] and verdicts["3bit"]["verdict"] == "OUTSIDE noise"
    assert noise.comparable(cpu, {**cuda, "settings": {**settings, "tokens": 20}}) == "tokens 10 vs 20"


def test_verdict_judges_needles_on_the_longest_needle_run() -> None:
    """A long-text perplexity run without needles is the perplexity headline; the needle verdict comes from the
    run with the longest needle context, and says how long."""
    bf16 = {"label": "bf16", "family": "reference", "avg_bits": 16.0, "ppl": 100.0}

    def run(tokens: int, contexts: list[int], lost: bool, utc: str) -> dict[str, Any]:
        needle = [{"context": c, "depth": 0.5, "correct": True} for c in contexts]
        ours = {**_seeded("4bit", {0: 101.0})[0], "label": "4bit",
                "needle": [{**n, "correct": not lost} for n in needle], "needle_correct": 0 if lost else len(needle)}
        configs = [{**bf16, "needle": needle, "needle_correct": len(needle)}, ours]
        return {"model": "m", "path": "CPU", "utc": utc, "configs": configs, "goals": goals.evaluate(configs),
                "settings": {"tokens": tokens, "needle_contexts": contexts}}

    runs = [run(8000, [], False, "1"), run(1000, [32000], True, "2"), run(1500, [1500], False, "3")]
    page = "\n".join(report.verdict_section(runs))
    assert "m, CPU (8000 tokens): **pass** — 4bit +1.00%" in page
    assert "m, CPU (needles up to 32000 tokens): **FAIL** — 4bit 0/1 (lost 32000 tok @ 0.5)" in page, page


def _full_softmax(rng: np.random.Generator, n: int, vocab: int, sharpness: float) -> np.ndarray:
    logits = rng.standard_normal((n, vocab)) * sharpness
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _topk(logp: np.ndarray, k: int) -> metrics.TopK:
    ids = np.argsort(-logp, axis=-1)[:, :k]
    return metrics.TopK(logp[:, 0], ids, np.take_along_axis(logp, ids, -1))


def test_topk_kl_is_a_close_lower_bound_of_the_full_kl() -> None:
    """The top-k + lumped-tail KL (metrics.py) against the exact full-vocabulary KL on known distributions: a lower
    bound (up to the missing-token approximation) that keeps most of the KL when the top-k holds most of the mass
    (here the reference tail mass is ~13% and the bound keeps ~80% of the KL)."""
    rng = np.random.default_rng(0)
    p = _full_softmax(rng, 200, 2000, sharpness=4.0)
    q = p + 0.5 * rng.standard_normal(p.shape)
    q -= np.log(np.exp(q).sum(-1, keepdims=True))
    exact = float((np.exp(p) * (p - q)).sum(-1).mean())
    approx, tail = metrics.kl_divergence(_topk(p, 20), _topk(q, 20))
    assert 0.7 * exact <= approx <= 1.02 * exact, (approx, exact, tail)
    assert metrics.kl_divergence(_topk(p, 20), _topk(p, 20))[0] == pytest.approx(0, abs=1e-12)
    assert metrics.top1_agreement(_topk(p, 20), _topk(p, 20)) == 1.0
    assert metrics.perplexity(_topk(p, 20)) == pytest.approx(math.exp(-p[:, 0].mean()))
