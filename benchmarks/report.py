"""Generate docs/results.md, docs/projection-405b.md, docs/errors.md and docs/img/*.png.

    python benchmarks/report.py [--results benchmarks/results] [--docs docs]

Inputs: benchmarks/results/*.json, the capacity planner and the plugin's source (docs/errors.md lists every
``raise`` in it). Every number in those pages comes from a results file, from the capacity planner (vllm_gds_plugin.capacity) or
from the public figures named in ``PUBLIC`` below: nothing is typed into the docs by hand. Re-run after adding
results; the pages say where each figure came from.

docs/results.md opens with the issues' targets against the newest measurement per device (benchmarks/targets.py).

Results files. Each is one JSON object; the renderer is chosen by its ``kind`` field, else by the file name's
prefix. Environment fields shown when present (top level or under ``versions``): ``device``, ``driver``,
``vllm``, ``torch``, ``triton``, ``command``, ``utc``/``date``. Known kinds and the fields they read:

``load`` (benchmarks/bench_load.py, file ``bench_load-*``)
    ``pinned_h2d_ceiling.gb_per_s``; per checkpoint ``bf16`` / ``fp8``: ``bytes`` and, per variant (e.g.
    ``ours_warm_repeat``, ``ours_cold``, ``safetensors_load_file_warm``, ``dd_iflag_direct``), ``gb_per_s``,
    ``seconds`` and optional ``mode``; ``engine.<loader>.time_to_ready_s``. Plot: GB/s per variant.
``load_tp`` (multi-GPU load, issue 10)
    ``rows``: [{``tp``, ``rank``, ``mode``, ``bytes``, ``seconds``, ``gb_per_s``}], optional
    ``time_to_ready_s``: {tp: seconds}. Plot: per-rank GB/s per TP.
``kv_serving`` (KV capacity and decode speed per KV dtype, issue 6/10)
    ``model``, ``rows``: [{``kv_cache_dtype``, ``kv_tokens``, ``tpot_ms``: {workload label: ms},
    optional ``prefill_s``: {label: s}}]. Plots: KV tokens and TPOT per KV dtype.
``accuracy`` (issue 7)
    ``rows``: [{``model``, ``kv_cache_dtype``, ``ppl``, ``delta_pct``, optional ``tokens``}], optional
    ``seed_stats``: {preset: {``n``, ``ppl_mean``, ``ppl_delta_pct_mean``, ``ppl_delta_pct_std``}} (its per-seed
    ``preset@seed`` rows collapse into one). Plot: perplexity delta per preset and model. ``tq_quality_proxy_*`` files ({``model``, ``bf16``, ``presets``: {name:
    {``ppl``, ``delta_pct``, ``avg_bits``}}}) are read as the same kind.
``shard`` (benchmarks/bench_shard.py, file ``bench_shard-*``)
    ``disk_write_gb_s``, ``runs``: {``tpN``: {``write_gb_s``, ``bytes``, ``wall_s``, ``peak_rss_gib``}}.
    Plot: write GB/s per TP against the disk.
``capacity_check`` (benchmarks/bench_capacity.py)
    ``rows``: [{``label``, ``kv_cache_dtype``, ``gpu_memory_utilization``, ``max_num_batched_tokens``,
    ``measured_tokens``, ``predicted_tokens``, ``error_pct``}]. Plot: vLLM vs planner tokens per case.
``attention_kernel`` (benchmarks/bench_tq_attention.py)
    ``hbm_peak_gbs``, ``rows``: [{``batch``, ``ctx``, ``kernel``, ``ms``, ``gbs``, ``pct_peak``}]. Plot: ms.
Anything else gets a generic table of its scalar fields and of its lists of records.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from vllm_gds_plugin import capacity as cap  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, however report.py is loaded
import targets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "benchmarks" / "public_configs"
GB = 1e9

# Public figures the projection rests on (each with its source); the page prints them.
PUBLIC = {
    "fsx_storage_tib": (96, "TiB of FSx for Lustre PERSISTENT-1000 SSD storage (the seeds' file system)"),
    "fsx_mb_s_per_tib": (1000, "MB/s per TiB disk throughput of PERSISTENT-1000 (AWS FSx for Lustre User Guide, "
                               "'Performance characteristics of SSD and HDD storage classes')"),
    "client_gbit_efa_gds": (1200, "Gbit/s to one client instance with EFA + GPUDirect Storage (AWS FSx for "
                                  "Lustre User Guide, 'Throughput to individual client instances')"),
    "client_gbit_efa": (700, "Gbit/s to one client instance with EFA, no GDS (same page)"),
    "client_gbit_ena": (100, "Gbit/s to one client instance over ENA only (same page)"),
}
NODES = {"P5en (8x H200)": "H200", "P6-B200 (8x B200)": "B200"}
PROJECTION_KV = ("auto", "fp8", "turboquant:k4v3", "turboquant:k3v3", "turboquant:k4v4", "turboquant_4bit_nc",
                 "turboquant_3bit_nc")


@dataclass
class Section:
    title: str
    source: str
    lines: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- formatting helpers


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        return f"{v:,.{max(0, 4 - int(math.floor(math.log10(abs(v)))) - 1)}f}" if abs(v) < 1000 else f"{v:,.0f}"
    text = cell(str(v))
    return text if len(text) <= 80 else text[:77] + "..."


def cell(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return out + [""]


def environment(doc: dict) -> str:
    env = {**doc, **(doc.get("versions") or {})}
    keys = ("device", "driver", "vllm", "torch", "triton", "utc", "date")
    parts = [f"{k} {env[k]}" for k in keys if env.get(k)]
    cmd = f"; command `{env['command']}`" if env.get("command") else ""
    return ", ".join(parts) + cmd


def bar_plot(path: Path, title: str, ylabel: str, groups: dict[str, dict[str, float]]) -> Path:
    """Grouped bars: ``groups`` = {group label: {series label: value}}."""
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) * 0.5 + 3), 4))
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = [j + i * width for j, g in enumerate(groups.values()) if s in g]
        ys = [g[s] for g in groups.values() if s in g]
        ax.bar(xs, ys, width, label=s)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels(list(groups), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image(sec: Section, img: Path, docs: Path) -> None:
    sec.lines += [f"![{sec.title}]({img.relative_to(docs).as_posix()})", ""]


# ---------------------------------------------------------------- renderers per kind


def render_load(doc: dict, sec: Section, img_dir: Path, docs: Path) -> None:
    """bench_load (ceilings, anchors, the ring's grid with where its threads spent their time, verify overhead,
    cold) and bench_ready (``vllm serve`` time-to-ready per loader) results."""
    if "pinned_h2d_ceiling" in doc:
        sec.lines += [f"Pinned host-to-device ceiling: {fmt(doc['pinned_h2d_ceiling'].get('gb_per_s'))} GB/s.", ""]
    if isinstance(doc.get("xxh3_128_gb_per_s_one_core"), dict):
        sec.lines += ["xxh3-128 on one core (GB/s): " + ", ".join(
            f"{k} {fmt(v)}" for k, v in doc["xxh3_128_gb_per_s_one_core"].items()) + ".", ""]
    groups: dict[str, dict[str, float]] = {}
    phases = ("ring_mib", "pump_s", "alloc_s", "read_s", "hash_s", "slot_wait_s", "issue_s", "checksum_s")
    for ckpt in ("bf16", "fp8"):
        res = doc.get(ckpt)
        if not isinstance(res, dict):
            continue
        sec.lines += [f"**{ckpt}** checkpoint: {fmt(res.get('bytes'))} bytes in {fmt(res.get('files'))} files.", ""]
        ceil = [r for r in res.get("read_ceiling", []) if isinstance(r, dict) and "gb_per_s" in r]
        if ceil:
            sec.lines += ["Page cache -> pinned memory, no GPU copy: " + ", ".join(
                f"{fmt(r['gb_per_s'])} GB/s ({r['threads']} threads)" for r in ceil) + ".", ""]
        c = res.get("contention")
        if isinstance(c, dict) and "read" in c:
            sec.lines += [f"Both at once (host memory contention): read {fmt(c['read'].get('gb_per_s'))} GB/s while "
                          f"pinned H2D ran at {fmt(c.get('h2d_gb_per_s_meanwhile'))} GB/s.", ""]
        named = {k: v for k, v in res.items() if isinstance(v, dict) and "gb_per_s" in v}
        named.update({k: v for k, v in (res.get("ours_sweep") or {}).items() if isinstance(v, dict) and "gb_per_s" in v})
        nested = res.get("ours_shm") if isinstance(res.get("ours_shm"), dict) else {}  # {"auto": row, "best": row}
        named.update({f"ours_shm_{k}": v for k, v in nested.items() if isinstance(v, dict) and "gb_per_s" in v})
        rows = [[name, v.get("mode", ""), v.get("seconds"), v.get("gb_per_s"),
                 *[(v.get("detail") or {}).get(k, "") for k in phases]] for name, v in named.items()]
        sec.lines += ["Seconds per phase are summed over the reader threads (alloc: pinned allocation; from "
                      "2026-12-06 14:00 the wait for the ring allocated ahead). checksum: verification's wait after "
                      "the read.", ""]
        sec.lines += table(["variant", "mode", "seconds", "GB/s", *phases], rows)
        skipped = {k: v for k, v in (res.get("ours_sweep") or {}).items() if isinstance(v, dict) and "gb_per_s" not in v}
        skipped |= {k: v for k, v in res.items() if k.endswith("_warm") and isinstance(v, dict) and "gb_per_s" not in v}
        if skipped:
            sec.lines += table(["variant", "not measured"], [[k, v.get("skipped", v.get("error"))] for k, v in skipped.items()])
        ver = {k: v for k, v in res.items() if k.startswith("verify_") and isinstance(v, dict) and "overhead" in v}
        if ver:
            sec.lines += table(["verify", "options", "on GB/s", "overhead"],
                               [[k, v.get("options"), (v.get("on") or {}).get("gb_per_s"), v["overhead"]]
                                for k, v in ver.items()])
        ck = res.get("checksum_kernel")
        if isinstance(ck, dict) and "all_wall_s" in ck:
            sec.lines += [f"Checksum of every parameter at once (what verify waits for after a load): wall "
                          f"{ck['all_wall_s']} s, the kernel alone {ck.get('all_kernel_s', 'not profiled')} s"
                          + (f" ({ck['all_kernel_gb_per_s']} GB/s)" if "all_kernel_gb_per_s" in ck else "")
                          + f"; first call (compile) {ck.get('first_call_s')} s.", ""]
        flip = res.get("verify_refuses_flip")
        if isinstance(flip, dict) and "refused" in flip:
            sec.lines += [f"One byte flipped in `{flip.get('tensor')}`: the verified load "
                          f"{'refused it, naming the tensor' if flip['refused'] else '**did not refuse it**'}.", ""]
        cold = res.get("cold")
        if isinstance(cold, dict) and "ours" in cold:
            sec.lines += [f"Cold ({cold.get('method')}): ours {fmt(cold['ours'].get('gb_per_s'))} GB/s "
                          f"({cold['ours'].get('mode')}), dd iflag=direct "
                          f"{fmt((cold.get('dd_iflag_direct') or {}).get('gb_per_s'))} GB/s, ratio "
                          f"{fmt(cold.get('ratio_to_dd'))}.", ""]
        if res.get("targets"):
            sec.lines += table(["target", "met"], [[k, v] for k, v in res["targets"].items()])
        groups[ckpt] = {r[0]: r[3] for r in rows}
    if groups:
        image(sec, bar_plot(img_dir / f"{sec.source}.png", "Weight loading GB/s per variant", "GB/s",
                            {v: {c: g[v] for c, g in groups.items() if v in g}
                             for v in dict.fromkeys(v for g in groups.values() for v in g)}), docs)
    engines = {k: v for k, v in {**(doc.get("engine") if isinstance(doc.get("engine"), dict) else {}),
                                 **{k: doc[k] for k in ("gds_sharded", "default_loader") if k in doc}}.items()
               if isinstance(v, dict)}
    if engines:
        keys = ("time_to_ready_s", "model_loading_s", "weight_loading_share", "loading_weights_s", "gds_sharded_s")
        sec.lines += table(["loader", *keys, "not measured"],
                           [[k, *[v.get(x) for x in keys], v.get("error", v.get("skipped", ""))]
                            for k, v in engines.items()])


def render_load_tp(doc: dict, sec: Section, img_dir: Path, docs: Path) -> None:
    rows = doc.get("rows", [])
    sec.lines += table(["tp", "rank", "mode", "bytes", "seconds", "GB/s"],
                       [[r.get("tp"), r.get("rank"), r.get("mode"), r.get("bytes"), r.get("seconds"),
                         r.get("gb_per_s")] for r in rows])
    if rows:
        groups: dict[str, dict[str, float]] = {}
        for r in rows:
            groups.setdefault(f"TP={r.get('tp')}", {})[str(r.get("rank"))] = r.get("gb_per_s", 0)
        image(sec, bar_plot(img_dir / f"{sec.source}.png", "Per-rank load GB/s", "GB/s", groups), docs)
    if isinstance(doc.get("time_to_ready_s"), dict):
        sec.lines += table(["tp", "time to ready (s)"], [[k, v] for k, v in doc["time_to_ready_s"].items()])


def render_kv_serving(doc: dict, sec: Section, img_dir: Path, docs: Path) -> None:
    """Per KV dtype: KV tokens, TPOT (median of the decode-only steps) per workload and prefill time, each with its
    ratio to the bf16 and fp8 rows of the same results; then issue 6's targets for ours at 3.5 bits. Older rows
    (per-dtype files) keep their per-workload prefill in ``prefill_s_all`` (``prefill_s`` has only 8x32K)."""
    rows = [r for r in doc.get("rows", []) if "skipped" not in r]
    bf16, fp8 = targets.reference_rows(rows)
    tpot, prefill, ratio = targets.tpot, targets.prefill, targets.ratio
    loads = list(dict.fromkeys(w for r in rows for w in r.get("tpot_ms") or {}))
    pre = list(dict.fromkeys(w for r in rows for w in r.get("prefill_s_all") or r.get("prefill_s") or {}))
    sec.lines += [f"Model: {doc.get('model', '?')}.", ""] + ([doc["note"], ""] if doc.get("note") else [])
    refs = [(name, ref) for name, ref in (("x bf16", bf16), ("x fp8", fp8)) if ref]  # TPOT ratio columns
    sec.lines += table(
        ["KV dtype", "KV tokens", "x bf16", *[f"{h} {w}" for w in loads for h in ("TPOT (ms)", *dict(refs))],
         *[f"{h} {w}" for w in pre for h in ("prefill (s)", "x bf16")]],
        [[r.get("kv_cache_dtype"), r.get("kv_tokens"), ratio(r.get("kv_tokens"), bf16.get("kv_tokens")),
          *[v for w in loads for v in (tpot(r, w), *[ratio(tpot(r, w), tpot(ref, w)) for _, ref in refs])],
          *[v for w in pre for v in (prefill(r, w), ratio(prefill(r, w), prefill(bf16, w)))]] for r in rows])
    detail = [[r.get("kv_cache_dtype"), w, *[(m.get("tpot_ms") or {}).get(k) for k in ("median", "mean", "p90")],
               m.get("decode_only_steps"), m.get("prefill_s"), m.get("prefill_steps")]
              for r in rows for w, m in (r.get("workloads") or {}).items()]
    if detail:
        sec.lines += ["TPOT over the decode-only engine steps (every request has its first token, none has finished, "
                      "each gets one token); prefill: from adding the requests until every first token.", ""]
        sec.lines += table(["KV dtype", "workload", "TPOT median (ms)", "mean (ms)", "p90 (ms)", "decode steps",
                            "prefill (s)", "prefill steps"], detail)
    verdicts = targets.serving_verdicts(rows)
    if verdicts and {"bs32@4K", "bs8@32K"} & set(loads):
        sec.lines += ["Issue 6 targets (ours at 3.5 bits):", ""]
        sec.lines += table(["KV dtype", "target", "measured", "result"],
                           [[r.get("kv_cache_dtype"), name, v, {None: "not measured", True: "pass", False: "FAIL"}[met]]
                            for r, name, v, met in verdicts])
    missing = [f"- {r.get('label', r.get('kv_cache_dtype'))}: {r.get('skipped') or r.get('error')}"
               for r in doc.get("rows", []) if r.get("skipped") or r.get("error")]
    if missing:
        sec.lines += ["Not (fully) measured:", "", *missing, ""]
    sized = {r["kv_cache_dtype"]: {"KV tokens": r["kv_tokens"]} for r in rows if r.get("kv_tokens")}
    if sized:
        image(sec, bar_plot(img_dir / f"{sec.source}-tokens.png", "KV-cache tokens per KV dtype", "tokens", sized),
              docs)
    if loads:
        image(sec, bar_plot(img_dir / f"{sec.source}-tpot.png", "Decode TPOT per KV dtype" + (" (median step)" if detail else ""), "ms",
                            {r["kv_cache_dtype"]: {w: v for w, v in (r.get("tpot_ms") or {}).items() if v is not None}
                             for r in rows}), docs)


def render_accuracy(doc: dict, sec: Section, img_dir: Path, docs: Path) -> None:
    rows = doc.get("rows")
    if rows is None:  # tq_quality_proxy layout
        rows = [{"model": doc.get("model"), "kv_cache_dtype": name, "ppl": v.get("ppl"), "delta_pct": v.get("delta_pct"),
                 "tokens": doc.get("tokens")} for name, v in (doc.get("presets") or {}).items()]
        if "bf16" in doc:
            sec.lines += [f"bf16-KV reference perplexity: {fmt(doc['bf16'])}.", ""]
    # Presets run with several rotation seeds (benchmarks/accuracy --seeds): one row of mean ± std per preset.
    stats = doc.get("seed_stats") or {}
    rows = [r for r in rows if str(r.get("kv_cache_dtype")).partition("@")[0] not in stats] + [
        {"model": doc.get("model"), "kv_cache_dtype": f"{name} (mean of {st['n']} seeds)", "ppl": st.get("ppl_mean"),
         "delta_pct": st.get("ppl_delta_pct_mean"), "delta_std": st.get("ppl_delta_pct_std"),
         "tokens": (doc.get("settings") or {}).get("tokens")} for name, st in stats.items()]
    sec.lines += table(["model", "KV dtype", "tokens", "perplexity", "delta %", "seed std of delta %"],
                       [[r.get("model"), r.get("kv_cache_dtype"), r.get("tokens"), r.get("ppl"), r.get("delta_pct"),
                         r.get("delta_std", "")] for r in rows])
    if doc.get("kind") == "accuracy":
        sec.lines += ["Goals, top-1 agreement, KL, needle and the CPU-vs-CUDA verdict: [accuracy.md](accuracy.md).", ""]
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("delta_pct") is not None:
            groups.setdefault(str(r.get("kv_cache_dtype")), {})[str(r.get("model"))] = r["delta_pct"]
    if groups:
        image(sec, bar_plot(img_dir / f"{sec.source}.png", "Perplexity delta vs bf16 KV", "%", groups), docs)


def render_shard(doc: dict, sec: Section, img_dir: Path, docs: Path) -> None:
    runs = doc.get("runs") or {}
    sec.lines += [f"Device {doc.get('device')}, {fmt(doc.get('cores'))} cores; {fmt(doc.get('layers'))}-layer "
                  f"Llama-3.1-8B shape ({fmt((doc.get('source_bytes') or 0) / 1e9)} GB source), --jobs "
                  f"{fmt(doc.get('jobs'))}. Disk = the faster of buffered+fsync and O_DIRECT sequential writes of "
                  "the run's byte count, measured right after each run on the same file system; target: fraction "
                  ">= 0.8. RSS bound = base (RSS after imports) + (2.5 + PARAM_BUDGET_BATCHES) x largest read batch "
                  f"+ {fmt(doc.get('rss_slack_gib'))} GiB slack, per process (workers' peak for --jobs > 1).", ""]
    if "disk_write_gb_s" in doc:  # older results: one disk figure for the whole file
        sec.lines += [f"Disk sequential write: {fmt(doc['disk_write_gb_s'])} GB/s.", ""]
    sec.lines += table(["run", "GB", "seconds", "write GB/s", "disk GB/s", "fraction of disk", "peak RSS (GiB)",
                        "RSS bound (GiB)", "CPU user+sys s", "load avg"],
                       [[k, (v.get("bytes") or 0) / 1e9, v.get("wall_s"), v.get("write_gb_s"),
                         v.get("disk_gb_s", doc.get("disk_write_gb_s")), v.get("fraction_of_disk"),
                         v.get("rss_checked_gib", v.get("peak_rss_gib")), v.get("rss_bound_gib"),
                         (v["cpu_user_s"] + v["cpu_sys_s"]) if "cpu_sys_s" in v else None,
                         (v.get("load_avg_before") or [None])[0]] for k, v in runs.items()])
    if doc.get("skipped"):
        sec.lines += [f"Skipped (time budget): {', '.join(doc['skipped'])}.", ""]
    if runs:
        groups = {k: {"shard write": v.get("write_gb_s", 0),
                      "disk": v.get("disk_gb_s", doc.get("disk_write_gb_s", 0))} for k, v in runs.items()}
        image(sec, bar_plot(img_dir / f"{sec.source}.png", "vllm-gds shard write GB/s", "GB/s", groups), docs)


def render_attention(doc: dict, sec: Section, img_dir: Path, docs: Path) -> None:
    rows = [r for r in doc.get("rows", []) if "ms" in r]
    sec.lines += [f"HBM peak (device-to-device copy): {fmt(doc.get('hbm_peak_gbs'))} GB/s; shape "
                  f"{doc.get('shape')}.", ""]
    sec.lines += table(["batch", "context", "kernel", "ms", "GB/s", "% of peak"],
                       [[r.get("batch"), r.get("ctx"), r.get("kernel"), r.get("ms"), r.get("gbs"), r.get("pct_peak")]
                        for r in rows])
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        groups.setdefault(f"bs{r['batch']}@{r['ctx']}", {})[r["kernel"]] = r["ms"]
    if groups:
        image(sec, bar_plot(img_dir / f"{sec.source}.png", "Decode attention time per kernel", "ms", groups), docs)


def render_attention_prefill(doc: dict, sec: Section, img_dir: Path, docs: Path) -> None:
    """One chunked-prefill step per shape: FlashAttention on a bf16 paged cache vs our two prefill paths."""
    rows = [r for r in doc.get("rows", []) if "ms" in r]
    fa = {(r["batch"], r["ctx"], r["q_len"]): r["ms"] for r in rows if r["kernel"] == "fa_bf16"}
    sec.lines += ([doc["note"], ""] if doc.get("note") else []) + [f"Shape {doc.get('shape')}.", ""]
    sec.lines += table(["batch", "context", "query tokens", "kernel", "ms", "TFLOP/s", "time / FA bf16"],
                       [[r["batch"], r["ctx"], r["q_len"], r["kernel"], r["ms"], r.get("tflops"),
                         fmt(r["ms"] / fa[k]) if (k := (r["batch"], r["ctx"], r["q_len"])) in fa else None]
                        for r in rows])
    errors = [f"- {r['kernel']} bs{r.get('batch')} ctx{r.get('ctx')}: {r['error']}" for r in doc.get("rows", [])
              if "error" in r]
    if errors:
        sec.lines += ["Failed:", "", *errors, ""]
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        groups.setdefault(f"bs{r['batch']} ctx{r['ctx']} q{r['q_len']}", {})[r["kernel"]] = r["ms"]
    if groups:
        image(sec, bar_plot(img_dir / f"{sec.source}.png", "Prefill step attention time per kernel", "ms", groups),
              docs)


def render_capacity_check(doc: dict, sec: Section, img_dir: Path, docs: Path) -> None:
    rows = doc.get("rows", [])
    sec.lines += table(["case", "KV dtype", "util", "max batched tokens", "vLLM tokens", "planner tokens", "error %"],
                       [[r.get("label"), r.get("kv_cache_dtype"), r.get("gpu_memory_utilization"),
                         r.get("max_num_batched_tokens"), r.get("measured_tokens"), r.get("predicted_tokens"),
                         r.get("error_pct")] for r in rows])
    groups = {r["label"]: {"vLLM": r["measured_tokens"], "planner": r["predicted_tokens"]}
              for r in rows if r.get("measured_tokens")}
    if groups:
        image(sec, bar_plot(img_dir / f"{sec.source}.png", "KV tokens: vLLM vs planner", "tokens", groups), docs)


def render_generic(doc: dict, sec: Section, img_dir: Path, docs: Path) -> None:
    scalars, records = [], []
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        prefix, node = stack.pop(0)
        if isinstance(node, dict):
            stack += [(f"{prefix}{k}" if not prefix else f"{prefix}.{k}", v) for k, v in node.items()]
        elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
            records.append((prefix, node))
        else:
            scalars.append([prefix, node])
    sec.lines += table(["field", "value"], scalars)
    for name, recs in records:
        keys = list(dict.fromkeys(k for r in recs for k in r))
        sec.lines += [f"`{name}`:", ""] + table(keys, [[r.get(k) for k in keys] for r in recs])


RENDERERS: dict[str, Callable[[dict, Section, Path, Path], None]] = {
    "load": render_load, "load_tp": render_load_tp, "kv_serving": render_kv_serving, "accuracy": render_accuracy,
    "shard": render_shard, "attention_kernel": render_attention, "capacity_check": render_capacity_check,
    "attention_prefill": render_attention_prefill,
}
PREFIXES = {"bench_capacity": "capacity_check", "bench_load": "load", "bench_shard": "shard", "bench_tq_attention": "attention_kernel",
            "tq_quality_proxy": "accuracy"}


def kind_of(doc: dict, path: Path) -> str:
    if isinstance(doc.get("kind"), str):
        return doc["kind"]
    return next((k for p, k in PREFIXES.items() if path.stem.startswith(p)), "generic")


def load_results(results: Path) -> list[tuple[Path, dict]]:
    out = []
    for p in sorted(results.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"report: skipping {p}: {e}", file=sys.stderr)
            continue
        if isinstance(doc, dict):
            out.append((p, doc))
    return out


# ---------------------------------------------------------------- pages


def merge_split_runs(found: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """``kv_serving``: each combined run (one invocation measured every dtype, ``combined``) is its own section,
    newest first; the older per-dtype files (kv_serving-<label>-<utc>.json) of one device and model are shown as
    one table after them, with a note that their ratios compare separate invocations. All kv_serving sections sit
    where the first kv_serving file was; the section names every file."""
    out: list[tuple[Path, dict]] = []
    combined: list[tuple[Path, dict]] = []
    groups: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    at = None
    for path, doc in found:
        if kind_of(doc, path) == "kv_serving" and isinstance(doc.get("rows"), list):
            at = len(out) if at is None else at
            if doc.get("combined"):
                combined.append((path, doc))
            else:
                key = (str({**doc, **(doc.get("versions") or {})}.get("device")), str(doc.get("model")))
                groups.setdefault(key, []).append((path, doc))
        else:
            out.append((path, doc))
    older = []
    for files in groups.values():
        first_path, first = files[0]
        merged = {**first, "rows": [r for _, d in files for r in d["rows"]], "merged_files": [p.name for p, _ in files],
                  "utc": max(str(d.get("utc", "")) for _, d in files)}
        if len(files) > 1:
            merged["note"] = ("Older run: one invocation per KV dtype (files below), so the ratios compare separate "
                              "invocations; TPOT there is the difference of two generate() calls, not per step.")
        older.append((first_path if len(files) == 1 else first_path.with_name(f"kv_serving-{len(files)}-runs.json"),
                      merged))
    newest_first = sorted(combined, key=lambda pd: str(pd[1].get("utc", "")), reverse=True)
    if at is not None:
        out[at:at] = newest_first + sorted(older, key=lambda pd: pd[1]["utc"], reverse=True)
    return out


def results_page(found: list[tuple[Path, dict]], docs: Path) -> str:
    img_dir = docs / "img"
    lines = ["# Results", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json` (do not edit by hand).",
             ""]
    lines += targets.section(found, kind_of, lambda stem: f"[{stem}](#{stem.lower().replace('.', '')})")
    lines += ["## KV-cache capacity: planner vs vLLM on the H100", ""]
    lines += capacity_validation(docs)
    for path, doc in merge_split_runs(found):
        kind = kind_of(doc, path)
        sec = Section(title=path.stem, source=path.stem)
        try:
            RENDERERS.get(kind, render_generic)(doc, sec, img_dir, docs)
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            # A schema that drifted from the docstring still gets rendered, generically, and says so.
            sec.lines = [f"(renderer for kind `{kind}` failed: {type(e).__name__}: {e}; generic view)", ""]
            render_generic(doc, sec, img_dir, docs)
            kind = f"{kind}, generic"
        files = [path.with_name(n) for n in doc.get("merged_files", [path.name])]
        links = ", ".join(f"[`{rel}`](../{rel})" for rel in
                          (f.relative_to(ROOT).as_posix() if f.is_relative_to(ROOT) else str(f) for f in files))
        lines += [f"## {path.stem}", "", f"Kind `{kind}`, file(s) {links}. {environment(doc)}", ""]
        lines += sec.lines
    return "\n".join(lines).rstrip() + "\n"


def h100_plan() -> cap.Plan:
    c = cap.H100_CALIBRATION
    return cap.plan(cap.load_shape(CONFIGS / "llama-3.1-8b.json"), cap.PlanRequest(
        gpu_memory_bytes=c["gpu_memory_bytes"], gpu_memory_utilization=c["gpu_memory_utilization"],
        tensor_parallel_size=c["tensor_parallel_size"]))


def capacity_validation(docs: Path) -> list[str]:
    p = h100_plan()
    c = cap.H100_CALIBRATION
    rows = [[name, p.row(name).option.bytes_per_token, measured, p.row(name).tokens,
             f"{100 * (p.row(name).tokens / measured - 1):+.2f}"] for name, measured in c["kv_tokens"].items()]
    out = [f"{c['model']} on one H100 ({c['gpu_memory_bytes'] // cap.MiB:,} MiB), gpu_memory_utilization "
           f"{c['gpu_memory_utilization']}: vLLM 0.26's reported KV-cache tokens (issue 6) against "
           f"`vllm-gds capacity`. The planner's one fitted constant (non-KV fixed overhead "
           f"{cap.NON_KV_FIXED_BYTES / cap.MiB:.1f} MiB) comes from the bf16 row; the other rows are predictions.",
           ""]
    out += table(["KV dtype", "bytes/token/GPU", "measured tokens", "planner tokens", "error %"], rows)
    out += ["Constants of the capacity model (`vllm_gds_plugin/capacity.py`; formulas in "
            "[architecture.md](architecture.md#capacity-planner)):", ""]
    out += table(["constant", "value", "meaning"], [
        ["NON_KV_FIXED_BYTES", f"{cap.NON_KV_FIXED_BYTES / cap.MiB:.1f} MiB",
         "CUDA graphs + non-torch memory, fitted to the bf16 row above"],
        ["activations (this run)", f"{p.activation_bytes / cap.MiB:.1f} MiB",
         f"max_num_batched_tokens {cap.DEFAULT_MAX_NUM_BATCHED_TOKENS} x (2 hidden + 3 intermediate/tp) x 2 B"],
        ["weights (this run)", f"{p.weights.total / cap.GiB:.3f} GiB", "parameters counted from config.json"],
        ["BLOCK_SIZE", cap.BLOCK_SIZE, "tokens per KV block (pool rounded down to whole blocks)"],
        ["VOCAB_PADDING", cap.VOCAB_PADDING, "vocabulary padded to a multiple of this before the TP split"],
        ["NATIVE_TQ_BOUNDARY_LAYERS", cap.NATIVE_TQ_BOUNDARY_LAYERS,
         "first/last layers vLLM's native TurboQuant keeps in the model dtype"],
        *[[f"GPU_MEMORY[{k}]", f"{v // cap.MiB:,} MiB", "CUDA-reported total"] for k, v in cap.GPU_MEMORY.items()],
    ])
    ours = [[r.option.name, r.option.bytes_per_token, r.tokens, r.ratio_vs_auto] for r in p.rows
            if r.option.name in PROJECTION_KV]
    img = bar_plot(docs / "img" / "capacity-h100-llama8b.png", "Llama-3.1-8B KV tokens on one H100 (planner)",
                   "tokens", {r[0]: {"tokens": r[2]} for r in ours})
    return out + ["Planner figures for the plugin's main presets on the same GPU:", ""] + table(
        ["KV dtype", "bytes/token/GPU", "tokens", "x bf16"], ours) + [
        f"![capacity]({img.relative_to(docs).as_posix()})", ""]


def best_per_gpu_rate(found: list[tuple[Path, dict]]) -> tuple[float, str] | None:
    """Highest measured single-rank rate of our loader into GPU memory (multi-GPU rows preferred)."""
    tp_rows = [(r["gb_per_s"], f"{p.name}: TP={r.get('tp')} rank {r.get('rank')} mode {r.get('mode')}")
               for p, d in found if kind_of(d, p) == "load_tp" for r in d.get("rows", []) if r.get("gb_per_s")]
    if tp_rows:
        return max(tp_rows)
    single = [(v["gb_per_s"], f"{p.name}: fp8 {name} (mode {v.get('mode')}), one GPU")
              for p, d in found if kind_of(d, p) == "load" and isinstance(d.get("fp8"), dict)
              for name, v in d["fp8"].items()
              if name.startswith("ours_") and isinstance(v, dict) and "cold" not in name and v.get("gb_per_s")]
    return max(single) if single else None


def projection_page(found: list[tuple[Path, dict]], docs: Path) -> str:
    shape = cap.load_shape(CONFIGS / "llama-3.1-405b.json")
    lines = ["# Llama 3.1 405B FP8, TP=8: capacity and cold-start projection", "",
             "Generated by `python benchmarks/report.py` (do not edit by hand) from the capacity planner "
             "(`vllm-gds capacity`, model in [architecture.md](architecture.md#capacity-planner)), "
             "`benchmarks/public_configs/llama-3.1-405b.json`, our measurements in `benchmarks/results/`, and "
             "the public figures listed under Assumptions.", "", "## KV-cache capacity per node", ""]
    for node, gpu in NODES.items():
        p = cap.plan(shape, cap.PlanRequest(gpu_memory_bytes=cap.GPU_MEMORY[gpu], tensor_parallel_size=8,
                                            weights_dtype="fp8"))
        lines += [f"### {node}", "",
                  f"Per GPU: {cap.GPU_MEMORY[gpu] // cap.MiB:,} MiB x 0.9; FP8 weights "
                  f"{p.weights.total / cap.GiB:.2f} GiB, non-KV overhead {p.overhead_bytes / cap.GiB:.2f} GiB, "
                  f"KV pool {p.kv_pool_bytes / cap.GiB:.2f} GiB; {p.parallel.kv_heads} KV head per GPU.", ""]
        lines += table(["KV dtype", "bytes/token/GPU", "KV tokens", "x bf16", f"sequences of {p.max_model_len:,}"],
                       [[r.option.name, r.option.bytes_per_token, r.tokens, r.ratio_vs_auto, r.sequences_at_max_len]
                        for r in p.rows if r.option.name in PROJECTION_KV])
        lines += [f"Reproduce: `vllm-gds capacity --model benchmarks/public_configs/llama-3.1-405b.json "
                  f"--gpu-memory {gpu} --tensor-parallel-size 8 --weights-dtype fp8`", ""]
    lines += load_projection(shape, found)
    lines += ["## Assumptions", "",
              "- GPU memory is the CUDA-reported total (`nvidia-smi` Total), see `GPU_MEMORY` in "
              "`vllm_gds_plugin/capacity.py` for the public sources; utilization 0.9; vLLM's LLM-class batch "
              f"defaults ({cap.DEFAULT_MAX_NUM_BATCHED_TOKENS} batched tokens, {cap.DEFAULT_MAX_NUM_SEQS} sequences).",
              "- The non-KV overhead constant was calibrated at TP=1 on an H100; NCCL and custom all-reduce "
              "buffers at TP=8 (a few hundred MiB per GPU) are not modelled, so real pools are slightly smaller.",
              "- FP8 weights: per-tensor FP8 projections as `vllm-gds shard --quantization fp8` writes them; "
              "embeddings, LM head and norms in bf16.",
              *[f"- {v} {text}." for v, text in PUBLIC.values()], ""]
    return "\n".join(lines).rstrip() + "\n"


def load_projection(shape: cap.ModelShape, found: list[tuple[Path, dict]]) -> list[str]:
    w = cap.weights_per_gpu(shape, cap.Parallel.of(shape, 8), "fp8")
    per_rank = w.total - w.rotary_cache  # the shard files hold parameters; the rotary cache is computed
    total = 8 * per_rank
    storage = PUBLIC["fsx_storage_tib"][0] * PUBLIC["fsx_mb_s_per_tib"][0] * 2**20  # MB/s read as MiB/s
    bounds = [("file system aggregate (disk throughput)", total / storage,
               f"{total / GB:.1f} GB / {storage / 2**30:.2f} GiB/s")]
    for key, label in (("client_gbit_efa_gds", "one client over EFA + GDS"), ("client_gbit_efa", "EFA, no GDS"),
                       ("client_gbit_ena", "ENA only")):
        rate = PUBLIC[key][0] * 1e9 / 8
        bounds.append((f"node network: {label}", total / rate, f"{total / GB:.1f} GB / {rate / GB:.1f} GB/s"))
    measured = best_per_gpu_rate(found)
    out = ["## Cold start: reading the weights", "",
           f"Each of the 8 ranks reads only its own FP8 shard: {per_rank / GB:.2f} GB per rank, "
           f"{total / GB:.1f} GB in all. The load takes at least as long as the slowest of these bounds:", ""]
    rows = [[name, f"{secs:.1f}", how] for name, secs, how in bounds]
    if measured:
        rate, where = measured
        rows.append(["our loader into one GPU (measured)", f"{per_rank / (rate * GB):.1f}",
                     f"{per_rank / GB:.2f} GB / {rate:.1f} GB/s ({where})"])
    else:
        rows.append(["our loader into one GPU", "not yet measured",
                     "no load results in benchmarks/results/ yet (benchmarks/bench_load.py)"])
    out += table(["bound", "seconds", "how"], rows)
    storage_bound = bounds[0][1]
    gds_bound = max(storage_bound, bounds[1][1])
    if measured:
        expected = max(gds_bound, per_rank / (measured[0] * GB))
        out += [f"**Expected weight-loading time with EFA + GDS: {expected:.1f} s** (the largest of the file-system, "
                f"EFA+GDS and measured per-GPU bounds). Without GDS the pinned path also crosses host memory; "
                f"the EFA-only network bound is {bounds[2][1]:.1f} s.", ""]
    else:
        out += [f"**Expected weight-loading time: not yet measured.** The storage-side lower bound is "
                f"{gds_bound:.1f} s with EFA + GDS; the per-GPU rate of our loader decides whether that is reached.",
                ""]
    out += ["Not included: engine start (process spawn, NCCL init, CUDA-graph capture, memory profiling), "
            "which `vllm serve` time-to-ready adds on top. Eight ranks reading at once share the node's network "
            "and (without GDS) host memory bandwidth: multi-GPU measurements (issue 10) replace the single-GPU "
            "rate here when present.", ""]
    return out


# ---------------------------------------------------------------- error catalog

PLUGIN_SOURCES = (ROOT / "vllm_gds_plugin", ROOT / "kernels")
# Helpers that build an exception instead of naming its class at the raise site.
FACTORIES = {"fail": "ManifestError"}


def message_template(node: ast.expr | None) -> str:
    """An exception message as its author wrote it, each interpolated expression shown as ``{expr}``."""
    if node is None:
        return "(no message)"
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(message_template(v) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return f"{{{ast.unparse(node.value)}}}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return message_template(node.left) + message_template(node.right)
    return f"{{{ast.unparse(node)}}}"


def raise_sites(roots: Iterable[Path] = PLUGIN_SOURCES) -> list[tuple[str, str, str]]:
    """(exception class, file, message template) for every ``raise X(...)`` in the plugin's code, sorted."""
    out = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call):
                    continue  # bare re-raise or re-raising a caught exception: its origin is listed elsewhere
                func = node.exc.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ast.unparse(func))
                if name == "SystemExit":
                    continue  # a script's exit status, not an error
                args = node.exc.args
                if name in FACTORIES:
                    name, msg = FACTORIES[name], "field " + ": ".join(message_template(a) for a in args)
                else:
                    msg = " ".join(message_template(a) for a in args) if args else message_template(None)
                out.append((name, path.relative_to(ROOT).as_posix(), node.lineno, msg))
    return [(name, f, msg) for name, f, _, msg in sorted(out)]


def errors_page() -> str:
    sites = raise_sites()
    lines = ["# Every error the plugin raises", "",
             "Generated by `python benchmarks/report.py` from the plugin's source (every `raise` with a message; "
             "`{...}` is filled in at run time). Causes and fixes per error type: "
             "[troubleshooting.md](troubleshooting.md).", ""]
    for cls in sorted({c for c, _, _ in sites}):
        lines += [f"## {cls}", ""]
        lines += ["| where | message |", "|---|---|"]
        lines += [f"| {where} | {cell(msg)} |" for c, where, msg in sites if c == cls] + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    found = load_results(args.results)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "results.md").write_text(results_page(found, args.docs))
    (args.docs / "projection-405b.md").write_text(projection_page(found, args.docs))
    (args.docs / "errors.md").write_text(errors_page())
    print(f"report: {len(found)} results file(s) -> {args.docs}/results.md, projection-405b.md, errors.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
