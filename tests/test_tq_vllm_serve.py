"""`vllm serve <model> --kv-cache-dtype turboquant` (the real CLI, separate API-server and engine processes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import FAST_ENGINE_ENV

from vllm_gds_plugin.kvcache.presets import get_preset
from vllm_gds_plugin.localserver import post_json, vllm_server

pytestmark = pytest.mark.slow


def test_serve_turboquant_answers_a_completion(model_path: Path, tmp_path: Path) -> None:
    env = {**FAST_ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log = tmp_path / "serve.log"
    with vllm_server(model_path, "--kv-cache-dtype", "turboquant", "--enforce-eager", "--max-model-len", "1024",
                     "--dtype", "bfloat16", env=env, log_path=log) as base:
        reply = post_json(base + "/v1/completions", {"model": str(model_path), "prompt": "The capital of France is",
                                                      "max_tokens": 8, "temperature": 0})
    assert "Paris" in reply["choices"][0]["text"], reply
    # The engine process sized its cache from our packed slot: 1 GiB / (30 layers x 3 KV heads x slot bytes).
    tokens = int(re.search(r"KV cache size: ([\d,]+) tokens", log.read_text()).group(1).replace(",", ""))
    per_token = 30 * 3 * get_preset("turboquant").slot_bytes(64)
    assert tokens == pytest.approx(2**30 / per_token, rel=0.02), tokens
