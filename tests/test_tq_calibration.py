"""TurboQuant calibration through vLLM: found next to the model (or a shard output's source), chosen or disabled by
``--additional-config``, refused when it fits another model, warned about once when missing; this rank's KV heads.

Engines (real SmolLM2, 4-bit preset, perplexity over 512 tokens of lee_text):
- ``bare``: a model folder without calibration file (links to the real model's files), automatic lookup;
- ``off``: the real model folder (which has its calibration) with ``"calibration": "none"``;
- ``explicit``: the bare folder with ``"calibration": <the real model's file>``.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import FAST_ENGINE_KWARGS

from vllm_gds_plugin.compat.attention import install
from vllm_gds_plugin.compat.parallel import kv_head_slice
from vllm_gds_plugin.kvcache import calibration_lookup
from vllm_gds_plugin.kvcache.calibration import CALIBRATION_FILE, TurboQuantCalibration, TurboQuantCalibrationError

PRESET = "4bit"
PPL_TOKENS = 512
# Measured (512 tokens, 4bit; bf16 KV 25.50): uncalibrated 26.651, calibrated 26.186 (-1.7%) on an Intel box;
# 26.583 -> 26.340 (-0.9%) on an AMD EPYC box (each calibrates on its own CPU). Calibration must win by more than the
# seed-to-seed noise (~0.5%).
MIN_GAIN = 0.006
SMOLLM2_SHAPE = (30, 3, 64)

pytestmark = pytest.mark.slow


def _engine(model: Path, calibration: str | None = None) -> Any:
    install()
    from vllm import LLM

    section: dict[str, Any] = {"preset": PRESET}
    if calibration is not None:
        section["calibration"] = calibration
    return LLM(model=str(model), kv_cache_dtype="turboquant", additional_config={"turboquant": section},
               enable_prefix_caching=False, **FAST_ENGINE_KWARGS)


def perplexity(llm: Any, text: str, n_tokens: int) -> float:
    from vllm import SamplingParams, TokensPrompt

    ids = llm.get_tokenizer()(text)["input_ids"][:n_tokens]
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return math.exp(-sum(step[t].logprob for t, step in zip(ids[1:], out.prompt_logprobs[1:])) / (len(ids) - 1))


class Captured(logging.Handler):
    """Messages of the plugin's TurboQuant logger. (Not around an engine start: vLLM re-applies its logging
    config there, which drops handlers of the loggers under ``vllm``.)"""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def bare_folder(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model's files without its calibration file (symlinks, no copy)."""
    assert (model_path / CALIBRATION_FILE).is_file(), "assets.model_dir() prepares the calibration"
    out = tmp_path_factory.mktemp("bare-model")
    for p in model_path.iterdir():
        if p.name != CALIBRATION_FILE:
            (out / p.name).symlink_to(p)
    return out


@pytest.fixture(scope="module")
def bare(bare_folder: Path) -> Iterator[Any]:
    llm = _engine(bare_folder)
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def bare_ppl(bare: Any, lee_text: str) -> float:
    return perplexity(bare, lee_text, PPL_TOKENS)


def test_missing_calibration_warns_once_with_the_fix(bare_folder: Path) -> None:
    """What every attention layer of an engine on a folder without calibration calls: one warning per process,
    naming the exact command that fixes it. (The engine on that folder runs uncalibrated: next test.)"""
    calibration_lookup._warned = False  # once per process: measured from a fresh state
    handler = Captured()
    calibration_lookup.log.addHandler(handler)
    try:
        for _ in range(3):
            assert calibration_lookup.model_calibration(None, str(bare_folder), *SMOLLM2_SHAPE) is None
    finally:
        calibration_lookup.log.removeHandler(handler)
    assert len(handler.messages) == 1, handler.messages
    assert "WITHOUT calibration" in handler.messages[0], handler.messages
    assert f"`vllm-gds calibrate {bare_folder}`" in handler.messages[0], handler.messages


def test_none_disables_calibration(model_path: Path, bare_ppl: float, lee_text: str) -> None:
    """``"calibration": "none"`` on the calibrated folder computes exactly what the folder without a file does
    (both uncalibrated; the explicit-file test below shows calibration changes the result)."""
    llm = _engine(model_path, "none")
    try:
        assert perplexity(llm, lee_text, PPL_TOKENS) == bare_ppl
    finally:
        del llm
        gc.collect()


def test_explicit_calibration_file_improves_perplexity(model_path: Path, bare_folder: Path, bare_ppl: float,
                                                       lee_text: str) -> None:
    llm = _engine(bare_folder, str(model_path / CALIBRATION_FILE))
    try:
        ppl = perplexity(llm, lee_text, PPL_TOKENS)
    finally:
        del llm
        gc.collect()
    print(f"4bit ppl: calibrated {ppl:.3f}, uncalibrated {bare_ppl:.3f}")
    assert ppl <= bare_ppl * (1 - MIN_GAIN), (ppl, bare_ppl)


def test_calibration_of_another_model_fails_engine_start(model_path: Path, tmp_path: Path) -> None:
    """A file measured on a model with other dimensions is a startup error naming the file and the mismatch."""
    own = TurboQuantCalibration.load(model_path / CALIBRATION_FILE)
    other = TurboQuantCalibration(own.key_mean[:-1], own.key_scale[:-1], own.value_mean[:-1], own.value_scale[:-1],
                                  tokens=own.tokens, source="29-layer model")
    path = tmp_path / "other.tqcal"
    other.save(path)
    with pytest.raises(TurboQuantCalibrationError, match=re.escape(str(path)) + r".*layers 29 vs model 30"):
        _engine(model_path, str(path))
    gc.collect()


def test_missing_explicit_file_is_an_error(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(TurboQuantCalibrationError, match="does not exist"):
        calibration_lookup.model_calibration(str(tmp_path / "nope.tqcal"), str(model_path), *SMOLLM2_SHAPE)


def test_shard_output_uses_its_copy_or_the_source_calibration(sharded_bf16_tp1: Path, model_path: Path,
                                                              tmp_path: Path) -> None:
    """``vllm-gds shard`` copies the calibration file into OUT; an OUT made without it falls back to the source
    folder its manifest names (and the fix command calibrates that source into OUT)."""
    assert (sharded_bf16_tp1 / CALIBRATION_FILE).is_file()
    found = calibration_lookup.model_calibration(None, str(sharded_bf16_tp1), *SMOLLM2_SHAPE)
    own = TurboQuantCalibration.load(model_path / CALIBRATION_FILE)
    assert found is not None and found.key_mean.equal(own.key_mean)
    old_out = tmp_path / "out"
    old_out.mkdir()
    for name in ("manifest.json", "config.json"):
        (old_out / name).symlink_to(sharded_bf16_tp1 / name)
    assert calibration_lookup.candidates(str(old_out)) == [old_out / CALIBRATION_FILE, model_path / CALIBRATION_FILE]
    found = calibration_lookup.model_calibration(None, str(old_out), *SMOLLM2_SHAPE)
    assert found is not None and found.key_mean.equal(own.key_mean)


@pytest.mark.parametrize(("total", "tp", "expected"), [
    (3, 1, [(0, 3)]),
    (3, 3, [(0, 1), (1, 2), (2, 3)]),
    (8, 2, [(0, 4), (4, 8)]),
    (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # tp > KV heads: each head replicated on tp / heads ranks
    (1, 4, [(0, 1)] * 4),  # MQA
])
def test_rank_kv_heads_follow_vllm_qkv_split(total: int, tp: int, expected: list[tuple[int, int]]) -> None:
    """vLLM's QKVParallelLinear: contiguous blocks of heads, or head ``rank // replicas`` when replicated."""
    got = [kv_head_slice(total, r, tp) for r in range(tp)]
    assert [(s.start, s.stop) for s in got] == expected
