"""The ring pipeline's verification and its knobs, on the real SmolLM2 shards (no engine needed).

Reader threads never wait for a file's hash turn. With the manifest's block digests (format 2) each thread
checks the blocks of the chunk it read; without them (format 1) a chunk that is not next is deposited and hashed
by whoever advances the file to it. These tests feed real file bytes in every arrival order the threads can
produce and check both against the files, that corruption and gaps are caught, and that a slot waiting on a
deposited chunk is released by abort."""

from __future__ import annotations

import dataclasses
import random
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_gds_plugin.loading.loader import LoadOptions, ShardLoadError, load_rank
from vllm_gds_plugin.loading.manifest import VERIFY_BLOCK, Manifest, RankEntry, file_digests, xxh3_128_file
from vllm_gds_plugin.loading.readers.base import BlockVerifier, FileJob, OrderedDigests

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


def test_ring_knobs_are_used_and_reported(sharded_bf16_tp1: Path) -> None:
    """threads x slots x chunk is the ring actually run (log line ``ring=``, detail), bounded by pinned_mib;
    with verify on every parameter equals safetensors' reading of the files."""
    manifest = Manifest.load(sharded_bf16_tp1)
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


def _block_chunks(root: Path, manifest: Manifest, chunk: int) -> tuple[list[FileJob], list[tuple[int, int, bytes]]]:
    """Every file of rank 0 with its block digests, as (job, offset, bytes) chunks of ``chunk`` bytes."""
    jobs, chunks = [], []
    for j, f in enumerate(manifest.rank(0, 0).files):
        data = (root / f.path).read_bytes()
        jobs.append(FileJob(root / f.path, f.size, (), f.xxh3_128, None, f.blocks))
        chunks += [(j, off, data[off:off + chunk]) for off in range(0, f.size, chunk)]
    return jobs, chunks


@pytest.mark.parametrize("order", ["in_order", "shuffled"])
def test_block_digests_check_chunks_in_any_order_and_pieces(sharded_bf16_tp1: Path, order: str) -> None:
    """4 threads check 8 MiB chunks in any order, each fed in pieces of random sizes (block boundaries fall
    inside pieces); the manifest's block digests are the files' own, and every block is checked once."""
    manifest = Manifest.load(sharded_bf16_tp1)
    jobs, chunks = _block_chunks(sharded_bf16_tp1, manifest, 2 * VERIFY_BLOCK)
    assert sum(len(j.blocks) for j in jobs) > 8  # type: ignore[arg-type]
    assert [file_digests(j.path)[1] for j in jobs] == [j.blocks for j in jobs]
    if order == "shuffled":
        random.Random(0).shuffle(chunks)
    verifier = BlockVerifier(jobs)
    assert BlockVerifier.usable(jobs, 2 * VERIFY_BLOCK) and not BlockVerifier.usable(jobs, VERIFY_BLOCK // 2)
    errors: list[BaseException] = []

    def present(share: list[tuple[int, int, bytes]], seed: int) -> None:
        rng = random.Random(seed)
        try:
            for job, off, data in share:
                feed, view, pos = verifier.feeder(job, off), memoryview(data), 0
                while pos < len(view):
                    n = rng.randrange(1, 3 << 20)
                    feed(view[pos:pos + n])
                    pos += n
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(e)

    threads = [threading.Thread(target=present, args=(chunks[w::4], w)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    verifier.check()


def test_block_digests_name_the_corrupt_block_and_catch_a_skipped_chunk(sharded_bf16_tp1: Path) -> None:
    manifest = Manifest.load(sharded_bf16_tp1)
    jobs, chunks = _block_chunks(sharded_bf16_tp1, manifest, VERIFY_BLOCK)
    verifier = BlockVerifier(jobs)
    job, off, data = chunks[3]
    flipped = bytearray(data)
    flipped[12345] ^= 0x20
    lo = off
    with pytest.raises(ShardLoadError, match=rf"part-0\.safetensors: xxh3_64 digest mismatch in block 3 \(bytes "
                                             rf"{lo}-{lo + VERIFY_BLOCK}\): manifest says [0-9a-f]{{16}}"):
        verifier.feeder(job, off)(memoryview(bytes(flipped)))
    verifier = BlockVerifier(jobs)
    for job, off, data in chunks[:3] + chunks[4:]:
        verifier.feeder(job, off)(memoryview(data))
    n = len(jobs[job].blocks)  # type: ignore[arg-type]
    with pytest.raises(ShardLoadError, match=rf"{jobs[job].path.name}: verified {n - 1} of {n} blocks"):
        verifier.check()


def test_ring_verifies_by_block_when_chunks_fit_the_blocks(sharded_bf16_tp1: Path) -> None:
    """Format 2 and chunks that are whole blocks: block verification; 1 MiB chunks or a format 1 manifest
    (no block digests): the files' xxh3-128 in order. Every parameter equals safetensors' reading either way."""
    manifest = Manifest.load(sharded_bf16_tp1)
    v1 = dataclasses.replace(manifest, format_version=1, ranks={
        k: RankEntry(tuple(dataclasses.replace(f, blocks=None) for f in r.files)) for k, r in manifest.ranks.items()})
    reference: dict[str, torch.Tensor] = {}
    for f in manifest.rank(0, 0).files:
        tensors = load_file(sharded_bf16_tp1 / f.path)
        reference.update({t.name: tensors[t.name] for t in f.tensors})
    for m, chunk_mib, by_block in ((manifest, 4, 1.0), (manifest, 8, 1.0), (manifest, 1, 0.0), (v1, 8, 0.0)):
        dest = {name: torch.full_like(ref, float("nan")) for name, ref in reference.items()}
        report = load_rank(m, 0, 0, dest, LoadOptions(io="buffered", threads=3, chunk_mib=chunk_mib, verify=True))
        assert report.verified and report.detail["verify_by_block"] == by_block, (chunk_mib, report.detail)
        for name, ref in reference.items():
            assert torch.equal(dest[name], ref), name
