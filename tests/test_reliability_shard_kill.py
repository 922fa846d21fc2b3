"""Sharder atomicity: `vllm-gds shard` killed (SIGINT / SIGKILL) mid-write and at the publish step leaves OUT
either absent or complete and verifiable. Three real subprocesses run concurrently to share their start-up time
(benchmarks/fuzz.py kills at more points)."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kill_points import STAGES, KillPoint, judge, kill_at, leftovers, start_shard

pytestmark = pytest.mark.slow

POINTS = [
    KillPoint("sigint-while-writing-parts", STAGES["first-part"], 0.05, signal.SIGINT),
    KillPoint("sigkill-while-writing-parts", STAGES["third-part"], 0.0, signal.SIGKILL),
    KillPoint("sigkill-at-publish", STAGES["manifest"], 0.0, signal.SIGKILL),
]


def test_killed_shard_leaves_out_absent_or_complete(model_path: Path, tmp_path: Path) -> None:
    outs = [tmp_path / p.name / "out" for p in POINTS]
    for out in outs:
        out.parent.mkdir()
    procs = [start_shard(model_path, out) for out in outs]
    with ThreadPoolExecutor(len(POINTS)) as pool:  # every run watched (and killed) on time
        ends = list(pool.map(kill_at, procs, outs, POINTS))
    for p, out, ended in zip(POINTS, outs, ends):
        state = judge(out)
        if p.sig == signal.SIGINT:  # a catchable signal: the run cleans up and says so
            assert ended.startswith("exit 130") and "interrupted" in ended, ended
            assert state == "absent" and not leftovers(out)
        elif p.name == "sigkill-while-writing-parts":
            assert state == "absent", (p.name, ended)  # the manifest did not exist yet
        else:  # killed within a millisecond of the manifest appearing: before or after the rename
            assert state in ("absent", "complete"), (p.name, ended)
