"""Start and stop a real `vllm serve` on loopback (demo, tests, soak benchmark): bounded waits, stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post_json(url: str, payload: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def vllm_command(model: str | Path, port: int, *args: str) -> list[str]:
    """``vllm serve model`` on 127.0.0.1:port; ``python -m`` where vLLM was installed without its console script
    (``pip install --target``, as on the GPU machine)."""
    vllm_bin = Path(sys.executable).with_name("vllm")
    head = [str(vllm_bin)] if vllm_bin.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    return [*head, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]


def wait_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float, poll_s: float = 1.0) -> float:
    """Seconds until ``base``/health answers 200; raises (with the log's tail) if the server exits or times out."""
    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"vllm serve not ready after {timeout_s:.0f}s:\n{log_path.read_text()[-4000:]}")
        time.sleep(poll_s)


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@contextmanager
def vllm_server(model: str | Path, *args: str, env: dict[str, str] | None = None,
                log_path: Path, start_timeout: float = 300.0) -> Iterator[str]:
    """Run ``vllm serve model *args`` on 127.0.0.1; yield its base URL once /health answers.

    The server is started in its own process group and stopped by that PID (SIGTERM, then SIGKILL).
    Its combined output goes to ``log_path`` so a failing test can show why the server did not come up.
    """
    port = free_port()
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(vllm_command(model, port, *args), stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, log_path, start_timeout)
        yield base
    finally:
        stop(proc)
