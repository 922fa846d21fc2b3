"""Run ``vllm-gds shard`` in a subprocess and kill it at a chosen point; judge what it left behind.

Shared by tests/test_reliability_shard_kill.py and benchmarks/fuzz.py. A kill point is a glob (relative to the
output's parent) whose first match means the sharder reached that stage, plus a delay after it; the process is
then sent SIGINT or SIGKILL. Whatever the moment, ``OUT`` must be absent, or complete: a manifest that loads and
a ``verify`` that passes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vllm_gds_plugin.loading.manifest import Manifest
from vllm_gds_plugin.loading.sharder import verify


@dataclass(frozen=True)
class KillPoint:
    name: str
    glob: str  # e.g. "out.tmp-*/rank-pp0-tp0/part-0.safetensors"; "" = right after start
    delay_s: float
    sig: int


STAGES = {  # stage -> what appears when the sharder reaches it
    "start": "",
    "config": "{out}.tmp-*/config.json",
    "first-part": "{out}.tmp-*/rank-pp0-tp0/part-0.safetensors",
    "third-part": "{out}.tmp-*/rank-pp0-tp0/part-2.safetensors",
    "manifest": "{out}.tmp-*/manifest.json",  # written last, just before the folder is renamed into place
}


# A shell without job control starts background commands (`bash .ci/run &`, nohup) with SIGINT ignored, and
# every child inherits that: the Ctrl-C these tests send would then be ignored, not handled. They restore what an
# interactive terminal gives a process (Python turns SIGINT into KeyboardInterrupt).


@contextmanager
def ctrl_c_raises() -> Iterator[None]:
    """In this (main) thread: SIGINT raises KeyboardInterrupt while the block runs, whatever the parent set."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def start_shard(src: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "vllm_gds_plugin.cli", "shard", str(src), str(out), "--quantization", "none",
           "--max-file-size", "32MiB", *extra]
    with ctrl_c_raises():  # a handled SIGINT is reset to the default across exec: the child's Python handles it
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_at(proc: subprocess.Popen[str], out: Path, point: KillPoint, timeout: float = 300.0) -> str:
    """Wait for ``point``'s stage (polling every ms), sleep its delay, signal; return how the run ended."""
    deadline = time.monotonic() + timeout
    pattern = point.glob.format(out=out.name)
    while pattern and not any(out.parent.glob(pattern)):
        if proc.poll() is not None:
            break  # finished (or failed) before the stage was seen: judged like any other end
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{point.name}: stage {pattern} not reached in {timeout}s")
        time.sleep(0.001)
    time.sleep(point.delay_s)
    if proc.poll() is None:
        proc.send_signal(point.sig)
    _, err = proc.communicate(timeout=timeout)
    return f"exit {proc.returncode}" + (f": {err.strip().splitlines()[-1]}" if err.strip() else "")


def judge(out: Path) -> str:
    """'absent' or 'complete'; raises AssertionError for anything in between."""
    if not out.exists():
        return "absent"
    m = Manifest.load(out)  # ManifestError: OUT exists but is not complete
    problems = verify(out)
    assert not problems, f"{out} exists but does not verify: {problems}"
    assert sum(len(r.files) for r in m.ranks.values()) >= 1
    return "complete"


def leftovers(out: Path) -> list[Path]:
    """Staging folders a killed run could not remove (SIGKILL gives it no chance)."""
    return sorted(out.parent.glob(f"{out.name}.tmp-*"))


SIGNALS = {"SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}
