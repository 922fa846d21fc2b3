"""Per-tensor FP8 quantization variants on this machine's CPU (a decision aid for loading/fp8.py, not a test).

Same bytes from each variant, checked; times the best of 3 per (variant, step, threads) on one
Llama-3.1-8B MLP-shaped bf16 weight (14336 x 4096):

* ``four_pass``: float32 scratch per step: widen, divide, clamp, narrow (the sharder before 2026-12-06);
* ``three_pass``: the same without the clamp (a no-op: |w| / (amax / 448) rounds to at most 448);
* ``fused``: ``torch.div(bf16 step, 1-element float32 scale, out=fp8 step)``: one pass, float32 math;
* ``pool``: three_pass's steps spread over Python threads that each run torch with one OpenMP thread (OpenMP's
  thread count is per calling thread) and a scratch of their own: no OpenMP team barrier per pass, and a step's
  scratch stays in its core's cache. ``threads`` is then the pool size.

    python3 benchmarks/quant_variants.py [--threads 1 4 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from vllm_gds_plugin.loading.fp8 import FP8_DTYPE, FP8_MAX

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py, also under python -P
from machine import save_experiment  # noqa: E402

Variant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]


def scratch_passes(src: torch.Tensor, dst: torch.Tensor, scale: torch.Tensor, step: int, clamp: bool) -> None:
    tmp = torch.empty(step, dtype=torch.float32)
    for s in range(0, src.numel(), step):
        e = min(s + step, src.numel())
        t = tmp[:e - s]
        t.copy_(src[s:e]).div_(scale)
        dst[s:e].copy_(t.clamp_(-FP8_MAX, FP8_MAX) if clamp else t)


def fused(src: torch.Tensor, dst: torch.Tensor, scale: torch.Tensor, step: int) -> None:
    divisor = scale.reshape(1)
    for s in range(0, src.numel(), step):
        e = min(s + step, src.numel())
        torch.div(src[s:e], divisor, out=dst[s:e])


_local = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}


def pool(src: torch.Tensor, dst: torch.Tensor, scale: torch.Tensor, step: int) -> None:

    def one(s: int) -> None:
        e = min(s + step, src.numel())
        tmp = getattr(_local, "tmp", None)
        if tmp is None or tmp.numel() < step:
            _local.tmp = tmp = torch.empty(step, dtype=torch.float32)
        t = tmp[:e - s]
        t.copy_(src[s:e]).div_(scale)
        dst[s:e].copy_(t)
    list(_pool_of(torch.get_num_threads()).map(one, range(0, src.numel(), step)))  # the row's threads


def _pool_of(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    return _pools[threads]


def amax_time(src: torch.Tensor, step: int, pooled: bool) -> float:
    """Seconds for max |w| (the scale's pass before any variant): torch.aminmax with the row's OpenMP threads,
    or per step on the pool and combined."""
    t0 = time.perf_counter()
    if pooled:
        parts = list(_pool_of(torch.get_num_threads()).map(lambda s: torch.aminmax(src[s:s + step]),
                                                           range(0, src.numel(), step)))
        lo = min(float(a) for a, _ in parts)
        hi = max(float(b) for _, b in parts)
    else:
        lo_t, hi_t = torch.aminmax(src)
        lo, hi = float(lo_t), float(hi_t)
    assert hi >= lo
    return time.perf_counter() - t0


VARIANTS: dict[str, Variant] = {"four_pass": partial(scratch_passes, clamp=True),
                                "three_pass": partial(scratch_passes, clamp=False), "fused": fused, "pool": pool}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/experiments"))
    args = ap.parse_args()
    w = (torch.randn(14336, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    src = w.reshape(-1)
    lo, hi = torch.aminmax(w)
    scale = (torch.maximum(lo.abs(), hi.abs()).float() / FP8_MAX).clamp(min=1e-12)
    want = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(-1).view(torch.uint8)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, fn in VARIANTS.items():
            for step in ((1 << 17, 1 << 18, 1 << 19, 1 << 20) if name == "pool" else (1 << 20, 1 << 21, 1 << 22)):
                dst = torch.empty(src.numel(), dtype=FP8_DTYPE)
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn(src, dst, scale, step)
                    best = min(best, time.perf_counter() - t0)
                same = torch.equal(dst.view(torch.uint8), want)
                rows.append({"threads": threads, "variant": name, "step": step, "seconds": round(best, 4),
                             "gb_per_s_in": round(w.numel() * 2 / best / 1e9, 2), "same_bytes": same})
                print(rows[-1], flush=True)
        for pooled, step in ((False, 0), (True, 1 << 20), (True, 1 << 22)):
            best = min(amax_time(src, step, pooled) for _ in range(3))
            rows.append({"threads": threads, "variant": "amax_pool" if pooled else "amax_aminmax", "step": step,
                         "seconds": round(best, 4), "gb_per_s_in": round(w.numel() * 2 / best / 1e9, 2)})
            print(rows[-1], flush=True)
    save_experiment(args.out, "quant_variants", rows,
                    "python3 benchmarks/quant_variants.py " + " ".join(f"--threads {t}" for t in args.threads))


if __name__ == "__main__":
    main()
