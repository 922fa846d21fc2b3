"""The ring pipeline's verification hand-off and its knobs, on the real SmolLM2 shards (no engine needed).

Reader threads never wait for a file's hash turn: a chunk that is not next is deposited and hashed by whoever
advances the file to it. These tests feed real file bytes in every arrival order the threads can produce and
check the digest equals the file's, and that a slot waiting on a deposited chunk is released by abort."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shard_fixtures import version_1_copy
from vllm_gds_plugin.loading.loader import LoadOptions, ShardLoadError, load_rank
from vllm_gds_plugin.loading.manifest import Manifest, xxh3_128_file
from vllm_gds_plugin.loading.readers.base import FileJob, OrderedDigests

CHUNK = 1 << 20


def _jobs_and_chunks(root: Path, manifest: Manifest) -> tuple[list[FileJob], list[tuple[int, int, memoryview]]]:
    """Every file of rank 0 as (job, chunk index, bytes) in 1 MiB chunks."""
    jobs, chunks = [], []
    for j, f in enumerate(manifest.rank(0, 0).files):
        data = memoryview((root / f.path).read_bytes())
        jobs.append(FileJob(root / f.path, f.size, (), f.xxh3_128))
        chunks += [(j, k, data[off:off + CHUNK]) for k, off in enumerate(range(0, f.size, CHUNK))]
    return jobs, chunks


@pytest.mark.parametrize("order", ["in_order", "reversed", "shuffled"])
def test_digests_equal_the_files_in_any_arrival_order(sharded_bf16_tp1: Path, order: str) -> None:
    """4 threads present chunks as the ring would (claim when next, else deposit): reversed order makes every
    chunk but the last-presented one a deposit drained in one go; the digests match the manifest's."""
    manifest = Manifest.load(sharded_bf16_tp1)
    jobs, chunks = _jobs_and_chunks(sharded_bf16_tp1, manifest)
    if order == "reversed":
        chunks.reverse()
    elif order == "shuffled":
        random.Random(0).shuffle(chunks)
    digests = OrderedDigests(jobs)
    events: list[threading.Event] = []
    lock = threading.Lock()
    claimed = [0]

    def present(share: list[tuple[int, int, memoryview]]) -> None:
        for job, index, data in share:
            if digests.claim(job, index):
                for lo in range(0, len(data), 1 << 18):  # hashed in pieces, as the reader does while reading
                    digests.update(job, data[lo:lo + (1 << 18)])
                digests.release(job, index)
                with lock:
                    claimed[0] += 1
            else:
                ev = threading.Event()
                digests.deposit(job, index, data, ev)
                with lock:
                    events.append(ev)

    threads = [threading.Thread(target=present, args=(chunks[w::4],)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(ev.is_set() for ev in events)  # every deposited chunk was hashed (its slot may be reused)
    assert claimed[0] + len(events) == len(chunks)
    if order == "in_order":
        assert claimed[0] > 0
    digests.check()  # raises on any mismatch
    assert [j.xxh3_128 for j in jobs] == [xxh3_128_file(j.path) for j in jobs]


def test_abort_releases_deposited_chunks_and_a_gap_is_a_mismatch(sharded_bf16_tp1: Path) -> None:
    """A chunk that never arrives (its reader failed) leaves later chunks deposited; abort() must release them
    (their threads wait on these events before reusing slots). Without abort the digest cannot match."""
    manifest = Manifest.load(sharded_bf16_tp1)
    jobs, chunks = _jobs_and_chunks(sharded_bf16_tp1, manifest)
    digests = OrderedDigests(jobs)
    later = [threading.Event() for _ in chunks[1:4]]
    for (job, index, data), ev in zip(chunks[1:4], later):
        digests.deposit(job, index, data, ev)
    assert not any(ev.is_set() for ev in later)  # chunk 0 never came: nothing may be hashed out of order
    with pytest.raises(ShardLoadError, match=r"part-0\.safetensors: xxh3_128 digest mismatch"):
        digests.check()
    digests.abort()
    assert all(ev.is_set() for ev in later)
    late = threading.Event()
    digests.deposit(*chunks[4][:3], late)  # after abort: released at once
    assert late.is_set()


def test_ring_knobs_are_used_and_reported(sharded_bf16_tp1: Path, tmp_path: Path) -> None:
    """threads x slots x chunk is the ring actually run (log line ``ring=``, detail), bounded by pinned_mib;
    with verify on (a version 1 manifest: the ring hashes the files) every parameter equals safetensors'
    reading of the files."""
    manifest = Manifest.load(version_1_copy(sharded_bf16_tp1, tmp_path / "v1"))
    reference: dict[str, torch.Tensor] = {}
    for f in manifest.rank(0, 0).files:
        tensors = load_file(sharded_bf16_tp1 / f.path)
        reference.update({t.name: tensors[t.name] for t in f.tensors})
    for opts, layout in ((LoadOptions(io="buffered", threads=4, slots=3, chunk_mib=1, pinned_mib=64, verify=True),
                          (4, 3, 12)),
                         (LoadOptions(io="buffered", threads=4, slots=4, chunk_mib=2, pinned_mib=10), (4, 1.25, 10))):
        dest = {t.name: torch.full(t.shape, float("nan"), dtype=getattr(torch, t.dtype))
                for f in manifest.rank(0, 0).files for t in f.tensors}
        report = load_rank(manifest, 0, 0, dest, opts)
        d = report.detail
        assert (d["threads"], d["slots_per_thread"], d["ring_mib"]) == layout
        assert f"ring={layout[0]}x{layout[1]:g}x{opts.chunk_mib}MiB" in report.log_line()
        assert d["read_s"] > 0 and (d["hash_s"] > 0) == opts.verify
        for name, ref in reference.items():
            assert torch.equal(dest[name], ref), name
    with pytest.raises(ShardLoadError, match="slots must be >= 1"):
        LoadOptions.from_extra_config({"slots": 0})
    with pytest.raises(ShardLoadError, match="pinned_mib=8192 exceeds the 4096 MiB"):
        LoadOptions.from_extra_config({"pinned_mib": 8192})
