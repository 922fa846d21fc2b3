"""Where verification's extra load time goes (issue 4: verify <= 5%), on the GPU machine.

bench_load's Llama-3.1-8B-shaped shards (fp8 and bf16, in the page cache) loaded with the default options, each
variant ``--reps`` times, interleaved so that host noise hits them alike:

* ``off``: no verification;
* ``as_landed``: what ``verify`` does on CUDA: checksum batches launched as tensors land (loading/tensor_checks.py);
* ``after_read``: the same checks, all launched after the read (``TensorChecks(eager=False)``);
* ``after_read_planned``: as ``after_read``, with the checksum table built on a thread during the read.

Per run: load seconds, the readers' pump time, the wait after the read (``checksum_s``), and the launching
thread's flushes and their wall time. Overhead = fastest run of a variant / fastest ``off`` run - 1. Also the
checksum of every parameter at once (bench_load's ``checksum_kernel`` row: wall time and the kernel's own time).

    python3 -P benchmarks/verify_overhead.py --dir /tmp/lb --out $OUT   # ~1.5 min on the H100 (shards reused)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_load, also under python -P
import bench_load as bl  # noqa: E402

from vllm_gds_plugin.loading import loader  # noqa: E402
from vllm_gds_plugin.loading.tensor_checks import TensorChecks  # noqa: E402


class TimedChecks(TensorChecks):
    """TensorChecks counting its flushes and their wall time (the launching thread's cost beside the readers)."""

    flushes = 0
    flush_s = 0.0

    def _launch(self, upto: list[int]) -> None:
        t = time.perf_counter()
        super()._launch(upto)
        TimedChecks.flush_s += time.perf_counter() - t
        TimedChecks.flushes += 1


class PlannedEarly(TimedChecks):
    """After the read, with the table (kernels/checksum ``plan_checksums``) built on a thread during it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, eager=False, **kwargs)
        self._planner = threading.Thread(target=self._plan_on_stream, daemon=True)
        self._planner.start()

    def _plan_on_stream(self) -> None:
        with self._on_stream():
            self._planned()

    def finish(self) -> None:
        self._planner.join()
        super().finish()


VARIANTS = {"off": None, "as_landed": TimedChecks, "after_read": functools.partial(TimedChecks, eager=False),
            "after_read_planned": PlannedEarly}


def run_variant(m: bl.Manifest, dest: dict[str, torch.Tensor], checks: object) -> dict:
    TimedChecks.flushes, TimedChecks.flush_s = 0, 0.0
    loader.TensorChecks = checks or TensorChecks  # the class _read_checked builds
    try:
        r = bl.ours(m, dest, verify=checks is not None)
    finally:
        loader.TensorChecks = TensorChecks
    d = r["detail"]
    return {"seconds": r["seconds"], "pump_s": d.get("pump_s"), "read_s": d.get("read_s"),
            "checksum_s": d.get("checksum_s"), "flushes": TimedChecks.flushes, "flush_s": round(TimedChecks.flush_s, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-load"), help="bench_load's checkpoint folder")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    result: dict = {"command": " ".join([sys.executable, *sys.argv]), "utc": datetime.now(timezone.utc).isoformat(),
                    "versions": bl.versions(False), "variants": {}}
    for kind in ("fp8", "bf16"):
        m = bl.write_shards(args.dir / f"bench-{kind}-l{bl.LAYERS}-v3", kind == "fp8", 1 << 30)
        bl.warm(bl.files_of(m))
        dest = bl.destinations(m, "cuda")
        result[f"{kind}_checksum_kernel"] = bl.checksum_kernel_timing(dest)
        runs: dict[str, list[dict]] = {k: [] for k in VARIANTS}
        for _ in range(args.reps):
            for name, checks in VARIANTS.items():
                runs[name].append(run_variant(m, dest, checks))
        base = min(r["seconds"] for r in runs["off"])
        result["variants"][kind] = {
            name: {"min_s": min(r["seconds"] for r in rs), "median_s": statistics.median(r["seconds"] for r in rs),
                   "overhead": round(min(r["seconds"] for r in rs) / base - 1, 4), "runs": rs}
            for name, rs in runs.items()}
        for name, v in result["variants"][kind].items():
            print(f"{kind} {name}: overhead {v['overhead']:+.1%} (fastest {v['min_s']} s, median {v['median_s']} s); "
                  f"last run {v['runs'][-1]}", flush=True)
        print(f"{kind} checksum of all parameters: {result[f'{kind}_checksum_kernel']}", flush=True)
        del dest
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"verify_overhead-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
