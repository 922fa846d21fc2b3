"""benchmarks/report.py: every known results kind renders a table and a plot; unknown ones a generic table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["report"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


# One results file per kind, in the layouts the report's docstring documents (values are arbitrary inputs).
RESULTS = {
    "bench_load-20260101T000000Z.json": {
        "command": "python benchmarks/bench_load.py --dir /nvme", "versions": {"device": "NVIDIA H100 80GB HBM3"},
        "pinned_h2d_ceiling": {"gb_per_s": 53.1, "seconds": 0.16},
        "fp8": {"bytes": 8_000_000_000, "files": 8,
                "ours_warm_repeat": {"seconds": 0.2, "gb_per_s": 40.0, "mode": "pinned"},
                "ours_cold": {"seconds": 1.0, "gb_per_s": 8.0, "mode": "pinned"},
                "dd_iflag_direct": {"seconds": 1.1, "gb_per_s": 7.3}}},
    "kv.json": {"kind": "kv_serving", "model": "Llama-3.1-8B", "device": "NVIDIA H100 80GB HBM3", "rows": [
        {"kv_cache_dtype": "auto", "kv_tokens": 1000, "tpot_ms": {"bs32@4K": 12.0}},
        {"kv_cache_dtype": "turboquant", "kv_tokens": 4410, "tpot_ms": {"bs32@4K": 10.0}}]},
    "kv_serving-fp8-1.json": {"kind": "kv_serving", "model": "Llama-3.1-8B", "rows": [
        {"kv_cache_dtype": "fp8", "kv_tokens": 2000, "tpot_ms": {"bs32@4K": 11.0}}]},
    "kv_serving-tq-1.json": {"kind": "kv_serving", "model": "Llama-3.1-8B", "rows": [
        {"kv_cache_dtype": "turboquant:3bit", "kv_tokens": 5000, "tpot_ms": {"bs32@4K": 9.0}}]},
    "acc.json": {"kind": "accuracy", "rows": [
        {"model": "SmolLM2", "kv_cache_dtype": "turboquant:3bit", "ppl": 29.1, "delta_pct": 3.7}]},
    "tq_quality_proxy_smol.json": {"model": "smol", "tokens": 4000, "bf16": 28.05,
                                   "presets": {"k4v3": {"ppl": 28.3, "delta_pct": 0.9, "avg_bits": 3.5}}},
    "bench_shard-host-1.json": {"benchmark": "bench_shard", "disk_write_gb_s": 2.0, "quantization": "fp8",
                                "layers": 32, "runs": {"tp2": {"write_gb_s": 1.5, "bytes": 9, "wall_s": 6.0}}},
    "bench_tq_attention_1.json": {"hbm_peak_gbs": 3000.0, "shape": {"d": 128}, "rows": [
        {"batch": 32, "ctx": 4096, "kernel": "fa_bf16", "ms": 0.5, "gbs": 2100.0, "pct_peak": 70.0}]},
    "tp.json": {"kind": "load_tp", "rows": [{"tp": 8, "rank": "pp0-tp3", "mode": "gds", "bytes": 51_000_000_000,
                                              "seconds": 2.0, "gb_per_s": 25.5}]},
    "bench_capacity-1.json": {"kind": "capacity_check", "rows": [
        {"label": "8b-auto", "kv_cache_dtype": "auto", "gpu_memory_utilization": 0.9, "max_num_batched_tokens": 16384,
         "measured_tokens": 444528, "predicted_tokens": 444528, "error_pct": 0.0}]},
    "other.json": {"kind": "something_new", "value": 7, "items": [{"a": 1, "b": "x"}]},
}


def test_report_renders_every_kind(report, tmp_path: Path) -> None:
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    for name, doc in RESULTS.items():
        (results / name).write_text(json.dumps(doc))
    (results / "broken.json").write_text("{")  # skipped with a message, not fatal
    assert report.main(["--results", str(results), "--docs", str(docs)]) == 0
    page = (docs / "results.md").read_text()
    for name, doc in RESULTS.items():
        if not name.startswith("kv_serving-"):
            assert f"## {Path(name).stem}" in page
    merged = page.split("## kv_serving-2-runs\n", 1)[1].split("\n## ", 1)[0]  # one table for both dtypes
    assert "| fp8 | 2,000 |" in merged and "| turboquant:3bit | 5,000 |" in merged
    assert "kv_serving-fp8-1.json" in merged and "kv_serving-tq-1.json" in merged
    kinds = {"bench_load-20260101T000000Z": "load", "kv": "kv_serving", "acc": "accuracy", "tp": "load_tp",
             "tq_quality_proxy_smol": "accuracy", "bench_shard-host-1": "shard",
             "bench_tq_attention_1": "attention_kernel", "bench_capacity-1": "capacity_check",
             "other": "something_new"}
    for stem, kind in kinds.items():
        assert f"Kind `{kind}`" in page.split(f"## {stem}\n", 1)[1], stem
    assert "| ours_warm_repeat | pinned | 0.2000 | 40.00 |" in page
    assert "| turboquant | 4,410 | 4.410 | 10.00 |" in page
    assert "| items | " not in page and "| a | b |" in page  # records become their own table
    pngs = {p.name for p in (docs / "img").glob("*.png")}
    assert {"bench_load-20260101T000000Z.png", "kv-tokens.png", "kv-tpot.png", "acc.png", "tp.png",
            "bench_shard-host-1.png", "bench_tq_attention_1.png", "bench_capacity-1.png",
            "capacity-h100-llama8b.png"} <= pngs
    assert all((docs / "img" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    # The projection takes the per-GPU rate from the multi-GPU rows when present.
    proj = (docs / "projection-405b.md").read_text()
    assert "25.5 GB/s (tp.json: TP=8 rank pp0-tp3 mode gds)" in proj
    assert "Expected weight-loading time with EFA + GDS" in proj


def test_targets_at_a_glance_judge_the_newest_run_per_device(report, tmp_path: Path) -> None:
    """The at-a-glance table takes, per device, the newest file of a kind (by its ``utc`` or the date in its
    name) and judges it against the issue's limit: an older, better run of the same device does not count."""
    def shard(frac: float) -> dict:
        return {"benchmark": "bench_shard", "device": "cpu", "cores": 2, "jobs": 1,
                "runs": {"none-tp1": {"write_gb_s": 1.0, "fraction_of_disk": frac}}}

    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    files = {"bench_shard-vm-20260101-000000.json": shard(0.9), "bench_shard-vm-20260201-000000.json": shard(0.5),
             "bench_shard-gpuhost-20250101-000000.json": {**shard(0.85), "device": "NVIDIA H200", "cores": 16},
             # older layout, no disk measured per run: nothing to judge, and no newer run of its device is hidden
             "bench_shard-vm-20260301-000000.json": {**shard(0.0), "runs": {"none-tp1": {"write_gb_s": 1.0}}},
             "bench_shard-b200-20260101-000000.json": {"benchmark": "bench_shard", "device": "NVIDIA B200",
                                                      "runs": {"none-tp1": {"write_gb_s": 1.0}}},
             "kv.json": {"kind": "kv_serving", "device": "NVIDIA H100 80GB HBM3", "rows": [
                 {"kv_cache_dtype": "auto", "kv_tokens": 1000, "tpot_ms": {"bs32@4K": 12.0}},
                 {"kv_cache_dtype": "fp8", "kv_tokens": 2000, "tpot_ms": {"bs32@4K": 10.0}},
                 {"kv_cache_dtype": "turboquant", "kv_tokens": 2_000_000, "tpot_ms": {"bs32@4K": 11.0}}]}}
    for name, doc in files.items():
        (results / name).write_text(json.dumps(doc))
    assert report.main(["--results", str(results), "--docs", str(docs)]) == 0
    glance = (docs / "results.md").read_text().split("## Targets at a glance", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in glance.splitlines() if r.startswith("| 3 ") or r.startswith("| 6 ")]
    assert any("CPU box, 2 cores | none-tp1 50% | **missed** | [bench_shard-vm-20260201-000000]" in r for r in rows)
    assert not any("bench_shard-vm-20260101" in r for r in rows)
    assert not any("NVIDIA B200" in r for r in rows)
    assert any("NVIDIA H200 | none-tp1 85% | met |" in r for r in rows)
    assert any("KV tokens >= 1.96M (4.4x bf16) | NVIDIA H100 80GB HBM3 | 2,000,000 | met" in r for r in rows)
    assert any("TPOT bs32@4K <= 10.4 ms | NVIDIA H100 80GB HBM3 | 11 | **missed**" in r for r in rows)
    assert any("TPOT bs32@4K / fp8 of this run <= 1 | NVIDIA H100 80GB HBM3 | 1.1 | **missed**" in r for r in rows)


def test_cold_load_row_comes_from_the_newest_run_that_measured_it(report, tmp_path: Path) -> None:
    """A loader run short of time skips its cold load: the warm and verify rows judge that newest run, the cold
    row the newest run that has one (not nothing)."""
    def load(utc: str, cold: bool) -> dict:
        fp8 = {"best_gb_per_s": 46.0, "targets": {"warm_ge_45": True, "warm_ge_0.8_pinned": True,
                                                  **({"cold_ge_0.9_dd": True} if cold else {})}}
        if cold:
            fp8["cold"] = {"ours": {"gb_per_s": 2.5}, "dd_iflag_direct": {"gb_per_s": 2.0}, "ratio_to_dd": 1.25}
        return {"utc": utc, "versions": {"device": "NVIDIA H100 80GB HBM3"}, "pinned_h2d_ceiling": {"gb_per_s": 55.0},
                "bf16": {"best_gb_per_s": 47.0, "targets": {"warm_ge_45": True, "warm_ge_0.8_pinned": True}},
                "fp8": fp8}

    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    (results / "bench_load-20260101T000000Z.json").write_text(json.dumps(load("2026-01-01T00:00:00", True)))
    (results / "bench_load-20260102T000000Z.json").write_text(json.dumps(load("2026-01-02T00:00:00", False)))
    assert report.main(["--results", str(results), "--docs", str(docs)]) == 0
    glance = (docs / "results.md").read_text().split("## Targets at a glance", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in glance.splitlines() if r.startswith("| 4 ")]
    assert any("warm load" in r and "[bench_load-20260102T000000Z]" in r for r in rows), rows
    assert any("cold (page cache dropped)" in r and "2.5 vs dd 2.0 GB/s (1.25x) | met | [bench_load-20260101T000000Z]"
               in r for r in rows), rows


def test_projection_says_not_measured_without_load_results(report, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    assert report.main(["--results", str(results), "--docs", str(tmp_path / "docs")]) == 0
    proj = (tmp_path / "docs" / "projection-405b.md").read_text()
    assert "not yet measured" in proj
    assert "### P5en (8x H200)" in proj and "### P6-B200 (8x B200)" in proj


def test_error_catalog_and_troubleshooting_cover_every_error_type(report) -> None:
    sites = report.raise_sites()
    assert ("CapacityError", "vllm_gds_plugin/capacity.py",
            "--tensor-parallel-size must be >= 1, got {tp}") in sites
    page = report.errors_page()
    assert all(f"## {cls}" in page for cls, _, _ in sites)
    guide = (ROOT / "docs" / "troubleshooting.md").read_text()
    undocumented = sorted({cls for cls, _, _ in sites if cls not in guide})
    assert not undocumented, f"docs/troubleshooting.md has no entry for {undocumented}"
