"""Targets at a glance: the numeric targets of issues 3-6 against the newest measurement of each, on every device
it was measured on. Rendered at the top of docs/results.md by report.py; every figure comes from the results file
named beside it (the accuracy goals of issue 7 are judged in docs/accuracy.md's verdict).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

Found = Iterable[tuple[Path, dict]]
KindOf = Callable[[dict, Path], str]


@dataclass(frozen=True)
class Check:
    issue: int
    target: str
    measured: str
    met: bool | None  # None: reported, the issue sets no pass/fail for it
    device: str
    source: str  # results file stem


def device_of(doc: dict) -> str:
    dev = doc.get("device") or (doc.get("versions") or {}).get("device") or "?"
    return f"CPU box, {doc['cores']} cores" if dev == "cpu" and doc.get("cores") else dev


def _when(path: Path, doc: dict) -> str:
    """Sortable time of a results file: its ``utc`` field, else the date-time in its name."""
    if doc.get("utc"):
        return re.sub(r"\D", "", str(doc["utc"]))[:14]
    m = re.search(r"(\d{8})[-T]?(\d{4,6})", path.stem)
    return (m.group(1) + m.group(2)).ljust(14, "0") if m else ""


def newest(found: Found, kind_of: KindOf, kind: str, keep: Callable[[dict], bool]) -> list[tuple[Path, dict]]:
    """Per device, the newest results file of ``kind`` that ``keep`` accepts."""
    best: dict[str, tuple[str, Path, dict]] = {}
    for path, doc in found:
        if kind_of(doc, path) == kind and keep(doc):
            dev, when = device_of(doc), _when(path, doc)
            if dev not in best or when > best[dev][0]:
                best[dev] = (when, path, doc)
    return [(p, d) for _, p, d in sorted(best.values(), key=lambda t: t[1].name)]


def _seconds(x: float | None) -> str:
    return "not measured" if x is None else f"{x:.2f} s"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _shard_fractions(doc: dict, quantization: str) -> dict[str, float]:
    """Run (``<quantization>-tp<N>``) -> fraction of the disk's write bandwidth (older results files measured no
    disk per run)."""
    return {k: v["fraction_of_disk"] for k, v in (doc.get("runs") or {}).items()
            if v.get("fraction_of_disk") is not None and k.startswith(f"{quantization}-")}


def shard_checks(path: Path, doc: dict, quantization: str) -> list[Check]:
    """One row per quantization, from the newest file that measured it on the device (a run of one
    quantization must not hide how the other did)."""
    runs = _shard_fractions(doc, quantization)
    jobs = f"--jobs {doc['jobs']} (worker start-up inside the wall time): " if (doc.get("jobs") or 1) > 1 else ""
    measured = jobs + ", ".join(f"{k} {_pct(v)}" for k, v in runs.items())
    return [Check(3, "shard write >= 80% of the disk's sequential write (same run)", measured,
                  all(v >= 0.8 for v in runs.values()), device_of(doc), path.stem)]


def load_checks(path: Path, doc: dict) -> list[Check]:
    bf16, fp8 = doc.get("bf16") or {}, doc.get("fp8") or {}
    tb, tf = bf16.get("targets") or {}, fp8.get("targets") or {}
    pinned = (doc.get("pinned_h2d_ceiling") or {}).get("gb_per_s")
    dev, src = device_of(doc), path.stem
    out = [Check(4, "warm load >= 45 GB/s and >= 0.8 x pinned H2D of the run",
                 f"best bf16 {bf16.get('best_gb_per_s')}, fp8 {fp8.get('best_gb_per_s')} GB/s; pinned H2D {pinned}",
                 all(t.get(k) for t in (tb, tf) for k in ("warm_ge_45", "warm_ge_0.8_pinned")), dev, src)]
    verify = {**_verify_overheads("bf16", bf16), **_verify_overheads("fp8", fp8)}
    if verify:
        out.append(Check(4, "verify on: <= 5% extra load time",
                         ", ".join(f"{k} options +{_pct(v)}" for k, v in verify.items()),
                         all(v <= 0.05 for v in verify.values()), dev, src))
    return out


def _cold(doc: dict) -> dict:
    return (doc.get("fp8") or {}).get("cold") or {}


def cold_checks(path: Path, doc: dict) -> list[Check]:
    """From the newest file that ran the cold load (a run short of time skips it)."""
    cold = _cold(doc)
    return [Check(4, "cold (page cache dropped) >= 0.9 x dd iflag=direct",
                  f"{cold['ours'].get('gb_per_s')} vs dd {(cold.get('dd_iflag_direct') or {}).get('gb_per_s')}"
                  f" GB/s ({cold.get('ratio_to_dd')}x)", bool(doc["fp8"]["targets"].get("cold_ge_0.9_dd")),
                  device_of(doc), path.stem)]


def _verify_overheads(kind: str, section: dict) -> dict[str, float]:
    """Verify on / off - 1 per options row: the ``verify_*`` off/on/off/on rows, and for files before those
    existed for FP8, its one verified load against the faster of the two unverified ones."""
    out = {f"{kind} {k[len('verify_'):]}": v["overhead"] for k, v in section.items()
           if k.startswith("verify_") and isinstance(v, dict) and "overhead" in v}
    for row, base in (("ours_default_verify", "ours_default"), ("ours_best_verify", "ours_best")):
        on, runs = (section.get(row) or {}).get("seconds"), (section.get(base) or {}).get("runs_s")
        if on and runs:
            out.setdefault(f"{kind} {base[len('ours_'):]}", on / min(runs) - 1)
    return out


def ready_checks(path: Path, doc: dict) -> list[Check]:
    loaders = {k: doc[k] for k in ("gds_sharded", "default_loader") if isinstance(doc.get(k), dict)}
    measured = "; ".join(f"{k} {v['time_to_ready_s']} s (model loading {_seconds(v.get('model_loading_s'))})"
                         for k, v in loaders.items() if v.get("time_to_ready_s") is not None)
    return [Check(4, "`vllm serve` time-to-ready, 8B FP8 (reported, no target)", measured, None, device_of(doc),
                  path.stem)]


def _ours(doc: dict) -> list[dict]:
    return [r for r in doc.get("rows") or [] if r.get("kernel") == "ours_turboquant"]


def _fa(doc: dict, kernel: str = "fa_bf16") -> dict[tuple[int, int], float]:
    return {(r["batch"], r["ctx"]): r["ms"] for r in doc.get("rows") or [] if r.get("kernel") == kernel and "ms" in r}


def attention_hbm_checks(path: Path, doc: dict) -> list[Check]:
    pct = [r["pct_peak"] for r in _ours(doc)]
    return [Check(5, "decode attention >= 70% of HBM peak (default preset, compressed bytes)",
                  f"{min(pct):.0f}-{max(pct):.0f}% of {doc.get('hbm_peak_gbs', 0) / 1e3:.2f} TB/s",
                  min(pct) >= 70, device_of(doc), path.stem)] if pct else []


def _fa_speedups(doc: dict, kernel: str = "fa_bf16", min_ctx: int = 16384) -> list[float]:
    fa = _fa(doc, kernel)
    return [fa[(r["batch"], r["ctx"])] / r["ms"] for r in _ours(doc)
            if r["ctx"] >= min_ctx and (r["batch"], r["ctx"]) in fa]


def attention_fa_checks(path: Path, doc: dict) -> list[Check]:
    """From the newest file that ran FA3 beside ours (a kernel-only run without vLLM has no FA3 anchor)."""
    s = _fa_speedups(doc)
    return [Check(5, "decode attention faster than FA3 bf16 at >= 16K context",
                  f"{min(s):.2f}-{max(s):.2f}x FA3's speed", min(s) > 1, device_of(doc), path.stem)] if s else []


def attention_fp8_checks(path: Path, doc: dict) -> list[Check]:
    """Context for issue 6's "decode faster than fp8": the same kernel table's FA3 on an fp8 cache (every point)."""
    s = _fa_speedups(doc, "fa_fp8", 0)
    return [Check(6, "decode attention vs FA3 on an fp8 KV cache, every point (reported, no target)",
                  f"{min(s):.2f}-{max(s):.2f}x FA3-fp8's speed", None, device_of(doc), path.stem)] if s else []


def tpot(r: dict, w: str) -> float | None:
    return (r.get("tpot_ms") or {}).get(w)


def prefill(r: dict, w: str) -> float | None:
    return (r.get("prefill_s_all") or r.get("prefill_s") or {}).get(w)


def ratio(v: float | None, ref: float | None) -> float | None:
    return v / ref if v is not None and ref else None


# Issue 6's targets for ours at 3.5 bits (the default preset, k4v3): (target, value of a row given the bf16 and
# fp8 rows of the same results, limit, True if the value must be >= the limit else <=).
SERVING_TARGETS: list[tuple[str, Callable[[dict, dict, dict], float | None], float, bool]] = [
    ("KV tokens >= 1.96M (4.4x bf16)", lambda r, b, f: r.get("kv_tokens"), 1_960_000, True),
    ("TPOT bs32@4K <= 10.4 ms", lambda r, b, f: tpot(r, "bs32@4K"), 10.4, False),
    ("TPOT bs8@32K <= 10 ms", lambda r, b, f: tpot(r, "bs8@32K"), 10.0, False),
    ("TPOT bs32@4K / fp8 of this run <= 1", lambda r, b, f: ratio(tpot(r, "bs32@4K"), tpot(f, "bs32@4K")), 1.0, False),
    ("TPOT bs8@32K / fp8 of this run <= 1", lambda r, b, f: ratio(tpot(r, "bs8@32K"), tpot(f, "bs8@32K")), 1.0, False),
    ("prefill 8x32K / bf16 of this run <= 1.10",
     lambda r, b, f: ratio(prefill(r, "bs8@32K"), prefill(b, "bs8@32K")), 1.10, False)]
# Our default preset, under each label a results file gives it (bench_tq_serving: the prefill kernel in brackets
# when the run chose it; the default's prefill kernel changed from triton to flash on 2026-12-06).
OURS_DEFAULT = ("turboquant", "turboquant:3.5bit", "turboquant (prefill: flash)", "turboquant (prefill: triton)")


def reference_rows(rows: list[dict]) -> tuple[dict, dict]:
    """The bf16 and fp8 rows of one serving results file ({} when absent)."""
    return (next((r for r in rows if r.get("label") == "bf16" or r.get("kv_cache_dtype") == "auto"), {}),
            next((r for r in rows if r.get("kv_cache_dtype") == "fp8"), {}))


def serving_verdicts(rows: list[dict]) -> list[tuple[dict, str, float | None, bool | None]]:
    """(row, target, measured, met) for ours at 3.5 bits; ``met`` None when not measured."""
    bf16, fp8 = reference_rows(rows)
    return [(r, name, v, None if v is None else v >= limit if at_least else v <= limit)
            for r in rows if r.get("kv_cache_dtype") in OURS_DEFAULT
            for name, get, limit, at_least in SERVING_TARGETS for v in [get(r, bf16, fp8)]]


def serving_checks(path: Path, doc: dict) -> list[Check]:
    rows = [r for r in doc.get("rows", []) if "skipped" not in r]
    return [Check(6, name if r["kv_cache_dtype"] == "turboquant" else f"{name} [{r['kv_cache_dtype']}]",
                  f"{v:,.0f}" if v >= 1000 else f"{v:.3g}", met, device_of(doc), path.stem)
            for r, name, v, met in serving_verdicts(rows) if v is not None]


def checks(found: Found, kind_of: KindOf) -> list[Check]:
    found = list(found)
    gpu_load = lambda d: bool((d.get("bf16") or {}).get("targets") or (d.get("fp8") or {}).get("targets"))  # noqa: E731
    plan: list[tuple[str, Callable[[dict], bool], Callable[[Path, dict], list[Check]]]] = [
        *(("shard", lambda d, q=q: bool(_shard_fractions(d, q)), partial(shard_checks, quantization=q))
          for q in ("none", "fp8")),
        ("load", gpu_load, load_checks),
        ("load", lambda d: gpu_load(d) and "ours" in _cold(d), cold_checks),
        ("load", lambda d: "gds_sharded" in d, ready_checks),
        ("attention_kernel", lambda d: bool(_ours(d)), attention_hbm_checks),
        ("attention_kernel", lambda d: bool(_fa_speedups(d)), attention_fa_checks),
        ("attention_kernel", lambda d: bool(_fa_speedups(d, "fa_fp8", 0)), attention_fp8_checks),
        ("kv_serving", lambda d: d.get("complete", True) and not d.get("smoke"), serving_checks)]
    out = [c for kind, keep, make in plan for p, d in newest(found, kind_of, kind, keep) for c in make(p, d)]
    return sorted(out, key=lambda c: c.issue)


def section(found: Found, kind_of: KindOf, link: Callable[[str], str]) -> list[str]:
    """The markdown of the at-a-glance table; ``link`` turns a results file stem into a markdown link."""
    rows = checks(found, kind_of)
    mark = {True: "met", False: "**missed**", None: "—"}
    return ["## Targets at a glance", "",
            "The issues' numeric targets against the newest measurement on each device (sections below have every "
            "run). Accuracy goals (issue 7): [accuracy.md](accuracy.md#verdict).", "",
            "| issue | target | device | measured | result | results file |", "|---|---|---|---|---|---|",
            *(f"| {c.issue} | {c.target} | {c.device} | {c.measured} | {mark[c.met]} | {link(c.source)} |"
              for c in rows), ""]
