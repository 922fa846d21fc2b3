"""Lustre striping for rank folders: large per-rank files read in parallel benefit from striping over many OSTs."""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Documented defaults (docs: vllm-gds shard --help): stripe each rank folder over 8 OSTs in 16 MiB stripes,
# so one rank's multi-GiB part files are served by several OSTs while ranks still spread over the file system.
DEFAULT_STRIPE_COUNT = 8
DEFAULT_STRIPE_SIZE = "16M"


@dataclass(frozen=True)
class Striping:
    count: int = DEFAULT_STRIPE_COUNT
    size: str = DEFAULT_STRIPE_SIZE

    def apply(self, folder: Path) -> bool:
        """``lfs setstripe`` on ``folder`` (new files inherit it). False, with one log line, where lfs is absent."""
        lfs = _lfs()
        if lfs is None:
            return False
        proc = subprocess.run([lfs, "setstripe", "-c", str(self.count), "-S", self.size, str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:  # e.g. not on a Lustre mount: striping is an optimisation, not a requirement
            log.warning("lfs setstripe on %s failed (%s); continuing without striping", folder,
                        proc.stderr.strip() or proc.returncode)
            return False
        return True


@functools.cache
def _lfs() -> str | None:
    lfs = shutil.which("lfs")
    if lfs is None:  # logged once per process, not once per rank folder
        log.info("lfs not on PATH: not setting Lustre striping on rank folders")
    return lfs
