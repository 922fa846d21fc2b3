"""The sharder's O_DIRECT writer (with its hasher thread) beside a thread that only runs Python, at several GIL
switch intervals (a decision aid for sharder.GIL_SWITCH_INTERVAL_S, not a test).

The writer and hasher take the GIL back after every ``pwrite`` and every torch op of a checksum; while another
thread runs Python (in the sharder: vLLM's weight loaders on the main thread), each of those waits up to
``sys.getswitchinterval()``. Writes 16 layers of Llama-3.1-8B FP8 shapes (3.5 GB) to ``--dir`` per row; the
disk's own rate (``dd oflag=direct``) for the same bytes is the last row.

    python3 benchmarks/writer_gil.py [--dir /tmp/writer-gil] [--out benchmarks/results/experiments]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from vllm_gds_plugin.loading.memory import huge_page_block
from vllm_gds_plugin.loading.writer import PATH_METADATA_KEY, Layout, PartFile, WriteQueue, spec_of

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py, also under python -P
from machine import save_experiment  # noqa: E402

LINEARS = (("qkv", (6144, 4096)), ("o", (4096, 4096)), ("gate_up", (28672, 4096)), ("down", (4096, 14336)))


def fp8_layers(layers: int) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i in range(layers):
        for name, shape in LINEARS:
            w = huge_page_block(shape[0] * shape[1]).view(torch.float8_e4m3fn).view(shape)  # page-aligned
            w.view(torch.uint8).fill_(7)
            out += [(f"l{i}.{name}.weight", w), (f"l{i}.{name}.weight_scale", torch.ones(1))]
        out += [(f"l{i}.norm{k}.weight", torch.ones(4096, dtype=torch.bfloat16)) for k in (1, 2)]
    return out


def write_once(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> float:
    q = WriteQueue()
    t0 = time.perf_counter()
    part = PartFile(path, "x", Layout.of([spec_of(n, t) for n, t in tensors], {PATH_METADATA_KEY: "x"}), q.hashing,
                    direct=True)
    for name, t in tensors:
        q.submit(part.write, name, t)
    q.drain()
    q.submit(part.finish).result()
    seconds = time.perf_counter() - t0
    q.close()
    path.unlink()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/writer-gil"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/experiments"))
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    tensors = fp8_layers(args.layers)
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    path = args.dir / "part.safetensors"
    stop = threading.Event()

    def python_busy() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i * i

    rows = []
    before = sys.getswitchinterval()
    for interval in (5e-3, 5e-4, 2e-4, 1e-4):
        sys.setswitchinterval(interval)
        for busy in (False, True):
            stop.clear()
            hog = threading.Thread(target=python_busy) if busy else None
            if hog is not None:
                hog.start()
            seconds = write_once(path, tensors)
            stop.set()
            if hog is not None:
                hog.join()
            rows.append({"switch_interval_ms": interval * 1e3, "python_busy_thread": busy,
                         "gb_per_s": round(nbytes / seconds / 1e9, 2)})
            print(rows[-1], flush=True)
    sys.setswitchinterval(before)
    mib = nbytes >> 20
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=64M", f"count={mib // 64}", "oflag=direct",
                    "conv=fsync"], check=True, capture_output=True)
    rows.append({"dd_oflag_direct_gb_per_s": round((mib // 64) * (64 << 20) / (time.perf_counter() - t0) / 1e9, 2)})
    print(rows[-1])
    path.unlink()
    save_experiment(args.out, "writer_gil", rows, "python3 benchmarks/writer_gil.py", bytes=nbytes)


if __name__ == "__main__":
    main()
