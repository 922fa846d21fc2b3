"""Every TurboQuant Triton kernel variant compiles for an H100 (sm_90), checked without a GPU.

The other kernel tests run the kernels in Triton's CPU interpreter, which accepts code the compiler refuses;
tests/compile_sm90.py records each launch the wrappers make and compiles it to a cubin with Triton's CUDA backend.
A fresh process: ``TRITON_INTERPRET=1`` (set when the kernel tests import the kernels) would make ``triton.jit``
the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_every_kernel_variant_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the GPU's Triton (3.6) default; silences 3.9's warning
    script = Path(__file__).with_name("compile_sm90.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.endswith(" 0 failed") and int(summary.split()[0]) >= 40, summary
