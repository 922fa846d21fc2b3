"""Environment block and result saving shared by the reliability benchmarks (fuzz.py, soak.py)."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

from machine import cpu_device, smi

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    """device, driver, vLLM/torch/triton versions, the command line and the time (what report.py shows)."""
    import torch

    info: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                            "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("vllm", "triton", "hypothesis"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["driver"] = smi("driver_version")
    else:
        info["device"] = cpu_device()
        info["driver"] = None
    return info


def save(kind: str, name: str, doc: dict[str, Any]) -> Path:
    """Write ``{kind, **environment, **doc}`` to benchmarks/results/<name>-<host>-<time>.json."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{platform.node()}-{stamp}.json"
    path.write_text(json.dumps({"kind": kind, **environment(), **doc}, indent=1) + "\n")
    return path
