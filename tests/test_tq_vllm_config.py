"""The `turboquant` KV dtype name, preset selection and refusals, against the real vLLM config/CLI classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import FAST_ENGINE_KWARGS

from vllm_gds_plugin.compat.attention import install, refusal
from vllm_gds_plugin.kvcache.presets import TurboQuantConfigError, get_preset
from vllm_gds_plugin.kvcache.selection import PRESET_ENV, select


@pytest.fixture(autouse=True)
def installed() -> None:
    install()
    install()  # idempotent


def test_cli_and_config_accept_turboquant_only() -> None:
    from vllm.config import CacheConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert parser.parse_args(["--kv-cache-dtype", "turboquant"]).kv_cache_dtype == "turboquant"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "turboquant_5bit"])
    assert CacheConfig(cache_dtype="turboquant").cache_dtype == "turboquant"
    assert STR_DTYPE_TO_TORCH_DTYPE["turboquant"] == torch.uint8


def test_preset_selection_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRESET_ENV, raising=False)
    assert select(None).preset == get_preset("turboquant")
    monkeypatch.setenv(PRESET_ENV, "3bit")
    assert select({}).preset == get_preset("3bit")
    chosen = select({"turboquant": {"preset": "4bit", "seed": 7}})
    assert (chosen.preset, chosen.seed) == (get_preset("4bit"), 7)
    assert "additional-config" in chosen.source


@pytest.mark.parametrize("config, env, message", [
    ({"turboquant": {"preset": "5bit"}}, None, r"--additional-config 'turboquant' preset: unknown TurboQuant preset"),
    ({}, "2.7bit", rf"environment variable {PRESET_ENV}: unknown TurboQuant preset '2\.7bit'"),
    ({"turboquant": {"bits": 3}}, None, r"unknown key\(s\) \['bits'\]"),
    ({"turboquant": {"seed": "x"}}, None, r"\"seed\" must be an integer"),
    ({"turboquant": "3bit"}, None, r"must be an object"),
])
def test_bad_selection_is_one_clear_error(config: dict, env: str | None, message: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv(PRESET_ENV, raising=False)
    else:
        monkeypatch.setenv(PRESET_ENV, env)
    with pytest.raises(TurboQuantConfigError, match=message):
        select(config)


def test_refusals_name_the_unsupported_feature() -> None:
    from vllm.v1.attention.selector import AttentionSelectorConfig

    ok = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="turboquant", block_size=None)
    assert refusal(ok) is None
    assert refusal(ok._replace(has_sliding_window=True)) == "sliding-window attention layers"
    assert refusal(ok._replace(use_mla=True, head_size=96)) == (
        "MLA attention, head_dim 96 (supported: (64, 128, 256))")
    assert refusal(ok._replace(dtype=torch.float32)) == "model dtype torch.float32 (float16/bfloat16 only)"
    # What vLLM's validate_configuration refuses for backends that do not opt in (vLLM does not validate ours).
    assert refusal(ok._replace(use_rswa=True)) == "R-SWA (reference sliding-window) attention"
    assert refusal(ok._replace(use_batch_invariant=True)).startswith("VLLM_BATCH_INVARIANT=1")
    assert refusal(ok._replace(use_adaptive_verification=True)).startswith("adaptive speculative verification")


@pytest.mark.slow
def test_unknown_preset_fails_engine_start(model_path: Path) -> None:
    from vllm import LLM

    with pytest.raises(TurboQuantConfigError, match="unknown TurboQuant preset '5bit'"):
        LLM(model=str(model_path), kv_cache_dtype="turboquant",
            additional_config={"turboquant": {"preset": "5bit"}}, **FAST_ENGINE_KWARGS)


def test_prefill_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """VLLM_GDS_TQ_PREFILL: flash by default (CUDA builds only: None on this CPU build, so the torch reference
    keeps prefill), triton on request, anything else a clear error."""
    from vllm_gds_plugin.compat.flash_attention import PREFILL_ENV, prefill_attention, prefill_kernel

    monkeypatch.delenv(PREFILL_ENV, raising=False)
    assert prefill_kernel() == "flash" and prefill_attention("cpu", 64) is None
    monkeypatch.setenv(PREFILL_ENV, "triton")
    assert prefill_kernel() == "triton" and prefill_attention("cuda", 128) is None
    monkeypatch.setenv(PREFILL_ENV, "fa3")
    with pytest.raises(TurboQuantConfigError, match="VLLM_GDS_TQ_PREFILL='fa3'"):
        prefill_attention("cuda", 128)
