"""Where a checksum pass over every parameter spends its wall time, stage by stage (issue 4: verify <= 5%).

On an H200 (bench_load-20261206T222939Z) the checksums of all Llama-3.1-8B bf16 parameters took 22 ms of wall
time, of which the kernel 3.8 ms; after a verified 8B FP8 load the wait is 14-25 ms against a 0.19-0.25 s load.
This splits one pass (`kernels/checksum/triton_checksum.ChecksumTable`) into the table build (CPU, then GPU
wait), the launch, the kernel wait and the result, three times, beside bench_load's ``checksum_kernel`` row (whole
passes: wall time and the kernel's own time), and adds a CPU+CUDA torch profile of one pass.
Llama-3.1-8B parameter shapes (bf16, random bytes) are allocated on the GPU; no vLLM, no files.

    python3 -P benchmarks/checksum_profile.py --out $OUT     # ~30 s on an H100, 16 GB of GPU memory

Runs on the CPU box too, small shapes through the interpreter (a check of the script, no timing value):
``VLLM_GDS_CHECKSUM_FORCE_TRITON=1 TRITON_INTERPRET=1 python3 -P benchmarks/checksum_profile.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_load, also under python -P
from bench_load import LAYERS, checksum_kernel_timing, llama8b_params, versions  # noqa: E402

from vllm_gds_plugin.kernels.checksum import triton_checksum  # noqa: E402


def llama_shapes(scale: int) -> list[tuple[int, ...]]:
    """bench_load's Llama-3.1-8B bf16 parameter shapes (fused qkv and gate_up as vLLM holds them), every size
    divided by ``scale`` and 2 layers when scale > 1 (the interpreter)."""
    return [tuple(d // scale for d in shape)
            for _, shape, _ in llama8b_params(fp8=False, layers=LAYERS if scale == 1 else 2)]


def stages(tensors: list[torch.Tensor], sync: Callable[[], None]) -> dict[str, float]:
    """One pass, each stage timed apart in ms (synchronizing between them, which a load does not)."""
    sync()
    t0 = time.perf_counter()
    table = triton_checksum.ChecksumTable(tensors)
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    table.launch(0, len(tensors))
    t3 = time.perf_counter()
    sync()
    t4 = time.perf_counter()
    table.result()
    t5 = time.perf_counter()
    ms = {"build_cpu": t1 - t0, "build_gpu_wait": t2 - t1, "launch_cpu": t3 - t2, "kernel_wait": t4 - t3,
          "result": t5 - t4, "total": t5 - t0}
    return {f"{k}_ms": round(v * 1e3, 3) for k, v in ms.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "experiments")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tensors = [torch.empty(s, dtype=torch.bfloat16, device=device).random_() for s in llama_shapes(1 if cuda else 64)]
    res: dict = {"command": " ".join(sys.argv), "utc": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
                 "versions": versions(cpu=not cuda),
                 "tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors)}
    # bench_load's row (compile, then whole passes: wall time against the kernel's profiled time), then the split
    res["checksum_kernel"] = checksum_kernel_timing(dict(enumerate(tensors)))
    res["stages"] = [stages(tensors, sync) for _ in range(3)]
    table = triton_checksum.ChecksumTable(tensors)
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        table.launch(0, 1)
    res["launch_one_tensor_us"] = round((time.perf_counter() - t0) / 20 * 1e6, 1)
    sync()
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            triton_checksum.checksums(tensors)
        events = prof.key_averages()
        res["profile_cpu_top_ms"] = [(e.key[:70], e.count, round(e.cpu_time_total / 1e3, 3),
                                      round(e.device_time_total / 1e3, 3))
                                     for e in sorted(events, key=lambda e: -e.cpu_time_total)[:15]]
        res["profile_cuda_top_ms"] = [(e.key[:70], e.count, round(e.device_time_total / 1e3, 3))
                                      for e in sorted(events, key=lambda e: -e.device_time_total)[:8]]
    text = json.dumps(res, indent=1)
    print(text)
    if cuda:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"checksum_profile-{res['utc']}.json"
        path.write_text(text + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
