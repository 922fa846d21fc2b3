"""Fuzz every parser of on-disk bytes at scale (>= 10,000 generated cases) and optionally kill the sharder at
random points; record outcome counts per exception type and the duration in benchmarks/results/ (kind "fuzz").

    python benchmarks/fuzz.py [--scale 1.0] [--seed 0] [--kill-runs 0]

The generators and targets are the test suite's (tests/fuzz_targets.py, tests/kill_points.py); a case whose
outcome is not the plugin's own refusal (or a clean load) is a bug: it is shrunk by hypothesis, reported with
its traceback under ``bugs`` and makes the exit status 1. Runs on CPU (no GPU needed).
"""

from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzz_targets as ft  # noqa: E402
from reliability_env import save  # noqa: E402

# target name -> (cases at scale 1, case runner given the scratch corpus and a hypothesis data object)
TARGETS: dict[str, tuple[int, Callable[[ft.Scratch, Any], str]]] = {
    "manifest_structured": (3000, lambda s, d: ft.manifest_doc_target(s, d.draw(ft.mutated(s.manifest_doc())))),
    "manifest_bytes": (1500, lambda s, d: ft.manifest_bytes_target(
        s, d.draw(ft.byte_mutated((s.pristine / "manifest.json").read_bytes())))),
    "manifest_file_lists": (1000, lambda s, d: ft.manifest_doc_target(s, d.draw(ft.file_list_attacks(s.manifest_doc())))),
    "shard_headers": (3000, lambda s, d: ft.shard_file_target(
        s, d.draw(ft.header_attacks(*ft.header_bytes(s.pristine / s.part(0, 0)))), 0,
        opts=d.draw(st.sampled_from(ft.LOAD_VARIANTS)))),
    "source_headers": (1500, lambda s, d: ft.source_target(
        s, d.draw(ft.header_attacks(*ft.header_bytes(s.pristine / s.part(1, 0)))))),
    "calibration_file": (1500, lambda s, d: ft.calibration_target(
        s, d.draw(ft.header_attacks(*ft.header_bytes(s.pristine / "calibration.tqcal"))))),
    "raw_header_bytes": (2000, lambda s, d: ft.raw_header_target(
        d.draw(st.binary(min_size=0, max_size=64)) + d.draw(st.binary(max_size=512)),
        d.draw(st.integers(0, 2**63)))),
}


class CaseHung(Exception):
    """A case ran past --case-timeout: a hang (or a pathological slowdown) is a bug like a crash."""


def _hung(signum: int, frame: Any) -> None:
    raise CaseHung(f"case still running after {signal.getitimer(signal.ITIMER_REAL)} s timer fired")


def run_target(name: str, n: int, fn: Callable[[ft.Scratch, Any], str], scratch: ft.Scratch,
               rng_seed: int, case_timeout_s: float) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    slowest = [0.0]

    @seed(rng_seed)
    @settings(max_examples=n, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(data=st.data())
    def case(data: Any) -> None:
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, case_timeout_s)  # SIGALRM -> CaseHung in this (main) thread
        try:
            counts[fn(scratch, data)] += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            slowest[0] = max(slowest[0], time.perf_counter() - t)

    t0 = time.perf_counter()
    bug = None
    try:
        case()
    except Exception as e:  # noqa: BLE001 - a bug found: record it, keep fuzzing the other targets
        bug = {"type": type(e).__name__, "message": str(e)[:2000], "traceback": traceback.format_exc()[-4000:]}
    seconds = time.perf_counter() - t0
    out = {"cases": sum(counts.values()), "outcomes": dict(counts.most_common()), "seconds": round(seconds, 2),
           "slowest_case_s": round(slowest[0], 3)}
    if bug:
        out["bug"] = bug
    print(f"{name}: {out['cases']} cases in {seconds:.1f} s: {out['outcomes']}" + (f"  BUG {bug['type']}" if bug else ""),
          flush=True)
    return out


def kill_runs(n: int, rng_seed: int, work: Path) -> dict[str, Any]:
    """``n`` sharder subprocesses killed at random stages / delays / signals; OUT judged each time."""
    from kill_points import SIGNALS, STAGES, KillPoint, judge, kill_at, leftovers, start_shard

    from vllm_gds_plugin.assets import model_dir

    rng = random.Random(rng_seed)
    rows = []
    for i in range(n):
        stage = rng.choice(list(STAGES))
        sig = rng.choice(list(SIGNALS))
        point = KillPoint(f"{stage}-{sig}", STAGES[stage], round(rng.uniform(0, 0.5), 3), SIGNALS[sig])
        out = work / f"kill-{i}" / "out"
        out.parent.mkdir(parents=True)
        ended = kill_at(start_shard(model_dir(), out), out, point)
        try:
            state = judge(out)
        except Exception as e:  # noqa: BLE001 - a half-written OUT is exactly the bug this looks for
            state = f"BROKEN: {type(e).__name__}: {e}"
        rows.append({"stage": stage, "signal": sig, "delay_s": point.delay_s, "ended": ended, "out": state,
                     "staging_left": len(leftovers(out))})
        print(f"kill {i}: {rows[-1]}", flush=True)
    return {"runs": rows, "states": dict(Counter(r["out"] for r in rows)),
            "broken": sum(r["out"].startswith("BROKEN") for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every target's case count (1.0: 12,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-runs", type=int, default=0, help="sharder subprocesses to kill at random points")
    ap.add_argument("--case-timeout", type=float, default=20.0, help="seconds; a slower case is reported as a hang")
    ap.add_argument("--max-memory-gib", type=float, default=8.0,
                    help="address-space limit of this process: a case that tries to allocate what a lying header "
                         "claims fails with MemoryError (reported as a bug) instead of taking the machine down")
    args = ap.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, _hung)
    limit = int(args.max_memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vllm-gds-fuzz-") as tmp:
        scratch = ft.Scratch.make(Path(tmp))
        targets = {name: run_target(name, max(1, int(n * args.scale)), fn, scratch, args.seed, args.case_timeout)
                   for name, (n, fn) in TARGETS.items()}
        kills = kill_runs(args.kill_runs, args.seed, Path(tmp)) if args.kill_runs else None
    totals: Counter[str] = Counter()
    for t in targets.values():
        totals.update(t["outcomes"])
    bugs = {k: t["bug"] for k, t in targets.items() if "bug" in t}
    doc = {"total_cases": sum(totals.values()), "outcomes": dict(totals.most_common()),
           "seconds": round(time.perf_counter() - t0, 1), "seed": args.seed, "targets": targets, "bugs": bugs,
           "limits": {"case_timeout_s": args.case_timeout, "address_space_gib": args.max_memory_gib},
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if kills:
        doc["kill_points"] = kills
    path = save("fuzz", "fuzz", doc)
    print(f"{doc['total_cases']} cases, {doc['outcomes']}, {doc['seconds']} s, bugs: {sorted(bugs) or 'none'} -> {path}")
    return 1 if bugs or (kills and kills["broken"]) else 0


if __name__ == "__main__":
    sys.exit(main())
