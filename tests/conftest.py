"""Shared fixtures: the embedded real model, real text, and fast real-vLLM engine settings for CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["shard_fixtures"]  # session-wide sharder outputs (tests/shard_fixtures.py)

# Fast, deterministic engine start on the 2-core CPU machine (see the foundation issue): in-process engine,
# no torch.compile, 1 GiB KV space, no thread pinning. Set before vLLM is imported anywhere.
FAST_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
for _k, _v in FAST_ENGINE_ENV.items():
    os.environ.setdefault(_k, _v)

# Engine kwargs for LLM(...) on CPU; tests add model/load_format/kv_cache_dtype.
FAST_ENGINE_KWARGS = dict(enforce_eager=True, distributed_executor_backend="uni", dtype="bfloat16",
                          max_model_len=2048, seed=0)


@pytest.fixture(scope="session")
def model_path() -> Path:
    from vllm_gds_plugin.assets import model_dir

    return model_dir()


@pytest.fixture(scope="session")
def lee_text() -> str:
    from vllm_gds_plugin.assets import lee_text as _lee

    return _lee()
