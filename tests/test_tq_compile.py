"""Every TurboQuant Triton kernel variant compiles for an H100 (sm_90), checked without a GPU.

The other kernel tests run the kernels in Triton's CPU interpreter, which accepts code the compiler refuses;
tests/compile_sm90.py records each launch the wrappers make and compiles it to a cubin with Triton's CUDA backend.
Twice: with the installed Triton, and with the H100 machine's Triton 3.6.0 (unpacked by scripts/setup.sh), whose
code generation differs (benchmarks/kernel_sass.py: 1.5x the instructions in the decode loop). A fresh process:
``TRITON_INTERPRET=1`` (set when the kernel tests import the kernels) would make ``triton.jit`` the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_gds_plugin.assets import cache_root

GPU_MACHINE_TRITON = cache_root() / "triton-3.6.0" / "site"


SITES = ["installed", "3.6.0"]


def _start(triton_site: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.6's default; silences 3.9's warning
    if triton_site != "installed":
        assert (GPU_MACHINE_TRITON / "triton" / "__init__.py").is_file(), "run scripts/setup.sh"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GPU_MACHINE_TRITON), env.get("PYTHONPATH")]))
        env["TRITON_CACHE_DIR"] = str(cache_root() / "triton-3.6.0" / "cache")
    script = Path(__file__).with_name("compile_sm90.py")
    return subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def compiles() -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Both Tritons compile at once: each run is one single-threaded process (4-5 min uncached), CI has 2 cores."""
    procs = {site: _start(site) for site in SITES}
    yield procs
    for proc in procs.values():  # a failed or interrupted test leaves no compiler running
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("triton_site", SITES)
def test_every_kernel_variant_compiles_for_sm90(triton_site: str, compiles: dict[str, subprocess.Popen[str]]) -> None:
    stdout, stderr = compiles[triton_site].communicate(timeout=900)
    assert compiles[triton_site].returncode == 0, stdout[-6000:] + stderr[-4000:]
    summary = stdout.strip().splitlines()[-1]
    expected = "" if triton_site == "installed" else f"(triton {triton_site})"
    assert expected in summary and summary.endswith(" 0 failed") and int(summary.split()[0]) >= 40, summary
