"""Foundation: the plugin is discovered and runs inside a real vLLM engine and a real `vllm serve`."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_gds_plugin.localserver import post_json, vllm_server
from conftest import FAST_ENGINE_ENV, FAST_ENGINE_KWARGS

import vllm_gds_plugin
from vllm_gds_plugin.compat.version import UnsupportedVLLMVersion, check_supported_vllm

PROMPTS = ["The capital of France is", "One, two, three, four,", "The opposite of hot is"]


def test_entry_point_is_declared() -> None:
    eps = md.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.value == "vllm_gds_plugin:register"]
    assert len(ours) == 1, [ep.value for ep in eps]
    assert ours[0].load() is vllm_gds_plugin.register


def test_every_package_ships_in_the_distribution() -> None:
    """pyproject lists packages explicitly (kernels/ is remapped); a forgotten one breaks non-editable installs."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in (("vllm_gds_plugin", "vllm_gds_plugin"), ("kernels", "vllm_gds_plugin.kernels")):
        for init in (root / folder).glob("**/__init__.py"):
            found.add(".".join((package, *init.parent.relative_to(root / folder).parts)))
    assert listed == found


def test_register_is_idempotent() -> None:
    vllm_gds_plugin.register()
    vllm_gds_plugin.register()
    assert vllm_gds_plugin._registered


@pytest.mark.parametrize("version", ["0.25.1", "0.33.0", "1.0.0"])
def test_unsupported_vllm_is_one_clear_error(version: str) -> None:
    with pytest.raises(UnsupportedVLLMVersion, match=r"supports vLLM 0\.26\.x, 0\.32\.x; found vLLM " + version):
        check_supported_vllm(version)


def test_unsupported_vllm_leaves_vllm_running_without_the_plugin() -> None:
    """On a vLLM outside the supported series register() warns once and hooks nothing: vLLM calls general plugins
    without a try, so raising would stop every engine of a deployment that only has the plugin installed. A fresh
    process, with the running vLLM's version string set to an unsupported one before register() reads it."""
    code = ("import vllm; vllm.__version__ = '0.34.0'\n"
            "import vllm_gds_plugin; vllm_gds_plugin.register(); vllm_gds_plugin.register()\n"
            "from typing import get_args; from vllm.config.cache import CacheDType\n"
            "print('turboquant accepted:', 'turboquant' in get_args(CacheDType))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "turboquant accepted: False" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "found vLLM 0.34.0" in line]
    assert len(warnings) == 1 and "stays inactive" in warnings[0], proc.stderr[-3000:]


def test_supported_series() -> None:
    assert check_supported_vllm("0.26.0") == (0, 26)
    assert check_supported_vllm("0.32.0+cpu") == (0, 32)


@pytest.fixture(scope="module")
def register_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trace") / "register.tsv"


def test_engine_discovers_plugin_and_generates(model_path: Path, register_trace: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A real vLLM engine loads our entry point (register() runs) and greedy output is sensible + repeatable."""
    monkeypatch.setenv(vllm_gds_plugin.TRACE_ENV, str(register_trace))
    # register() may already have run in this test process; the engine must run it through the entry point.
    monkeypatch.setattr(vllm_gds_plugin, "_registered", False)
    import vllm.plugins
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_path), **FAST_ENGINE_KWARGS)
    assert register_trace.exists(), "vLLM did not call vllm_gds_plugin.register() through its entry point"
    params = SamplingParams(temperature=0.0, max_tokens=12)
    first = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    second = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    assert first == second
    assert "Paris" in first[0]
    assert first[1].startswith(" five, six")
    assert "cold" in first[2]


def test_vllm_serve_answers_a_completion(model_path: Path, tmp_path: Path) -> None:
    trace = tmp_path / "register.tsv"
    env = {**FAST_ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", vllm_gds_plugin.TRACE_ENV: str(trace)}
    with vllm_server(model_path, "--enforce-eager", "--max-model-len", "1024", "--dtype", "bfloat16",
                     env=env, log_path=tmp_path / "serve.log") as base:
        reply = post_json(base + "/v1/completions", {"model": str(model_path), "prompt": PROMPTS[0],
                                                      "max_tokens": 8, "temperature": 0})
    assert "Paris" in reply["choices"][0]["text"]
    pids = {line.split("\t")[0] for line in trace.read_text().splitlines()}
    # API server and engine core are separate processes; the plugin must have registered in both.
    assert len(pids) >= 2, trace.read_text()
