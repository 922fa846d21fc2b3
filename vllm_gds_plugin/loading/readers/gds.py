"""GPUDirect Storage through fastsafetensors' cuFile bindings: each tensor's bytes are DMA'd from the file
straight into the parameter's GPU storage (O_DIRECT file handles, no host or GPU staging).

Whether cuFile really went direct or silently ran in compatibility mode (POSIX reads through a bounce buffer,
what happens without the nvidia-fs driver) is read off the nvidia-fs driver's own read counter.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from vllm_gds_plugin.loading.readers.base import FileJob, Landed, ReadResult, ShardLoadError
from vllm_gds_plugin.loading.shard_check import check_unchanged

NVFS_STATS = Path("/proc/driver/nvidia-fs/stats")
NVFS_DEVICE = Path("/dev/nvidia-fs0")


def _cpp() -> Any:
    import fastsafetensors.cpp as fstcpp

    return fstcpp


def gds_unavailable_reason(device: torch.device) -> str | None:
    """None when cuFile + nvidia-fs can serve ``device``, else why not (checked without calling cuFileDriverOpen
    on half-configured hosts, which closes fd 0: see fastsafetensors' copier/gds.py)."""
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    try:
        from fastsafetensors.copier.nogds import load_library_func
    except ImportError:
        return "fastsafetensors is not installed"
    if not NVFS_DEVICE.exists():
        return f"{NVFS_DEVICE} not found (nvidia-fs driver not loaded or not mapped into the container)"
    load_library_func()
    fst = _cpp()
    if not fst.is_cufile_found():
        return "libcufile.so not found"
    if fst.is_gds_supported(device.index or 0) != 1:
        return f"cuFile reports GDS unsupported on {device}"
    return None


def nvfs_reads() -> int | None:
    """The nvidia-fs driver's completed-read count (``Reads : n=...``), None without the driver."""
    try:
        text = NVFS_STATS.read_text()
    except OSError:
        return None
    m = re.search(r"^Reads\s*:\s*n=(\d+)", text, re.M)
    return int(m.group(1)) if m else None


class GdsReader:
    def __init__(self, device: torch.device, threads: int) -> None:
        self.device = device
        self.threads = threads

    def close(self) -> None:
        pass

    def read(self, jobs: list[FileJob], verify: bool, landed: Landed | None = None) -> ReadResult:
        if verify:
            raise ShardLoadError("verify=true needs a host read path (digests are computed on the staged bytes); "
                                 "drop force_mode='gds' or verify")
        from fastsafetensors.copier.gds import init_gds

        fst = _cpp()
        init_gds()
        reader = fst.gds_file_reader(self.threads, True, self.device.index or 0)
        before = nvfs_reads()
        total = 0
        for j, job in enumerate(jobs):
            # An fd of our own to compare the file's identity before and after cuFile read it.
            fd = os.open(job.path, os.O_RDONLY)
            try:
                check_unchanged(fd, job.path, job.identity, "before reading")
                total += self._read_file(fst, reader, job)
                check_unchanged(fd, job.path, job.identity, "after reading")
                if landed is not None:  # every read of the file was waited for
                    landed([(j, k) for k in range(len(job.segments))])
            finally:
                os.close(fd)
        torch.cuda.synchronize(self.device)
        after = nvfs_reads()
        direct = before is not None and after is not None and after > before
        return ReadResult(f"gds({'direct' if direct else 'compat'})", total, False)

    @staticmethod
    def _read_file(fst: Any, reader: Any, job: FileJob) -> int:
        fh = fst.gds_file_handle(str(job.path), True, True)  # O_DIRECT
        bufs, reqs = [], []
        for seg in job.segments:
            buf = fst.gds_device_buffer(seg.dest.data_ptr(), seg.nbytes, True)
            bufs.append(buf)  # keep alive until the read completed
            req = reader.submit_read(fh, buf, seg.offset, seg.nbytes, 0, job.size)
            if req < 0:
                raise ShardLoadError(f"{job.path}: cuFile read submit failed for {seg.name!r} (err={req})")
            reqs.append((seg, req))
        for seg, req in reqs:
            if reader.wait_read(req) < 0:
                raise ShardLoadError(f"{job.path}: cuFile read of {seg.name!r} failed")
        return sum(s.nbytes for s in job.segments)

