"""The shard tensor checksum: its plain-torch definition against an independent pure-Python reading of the bytes,
the Triton kernel (compiled on a GPU, TRITON_INTERPRET=1 on CPU) against the definition over many shapes and
dtypes, what it detects, and the loader verifying a real shard output through the kernel."""

from __future__ import annotations

import dataclasses
import os
import threading

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernel modules (triton.jit reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from shard_fixtures import copy_folder, flip_byte  # noqa: E402
from vllm_gds_plugin.kernels.checksum import naive, ops, triton_checksum  # noqa: E402
from vllm_gds_plugin.loading.loader import LoadOptions, ShardLoadError, load_rank, plan_rank  # noqa: E402
from vllm_gds_plugin.loading.manifest import Manifest  # noqa: E402
from vllm_gds_plugin.loading.readers.base import FileJob, Segment  # noqa: E402
from vllm_gds_plugin.loading.readers.host import HostReader  # noqa: E402
from vllm_gds_plugin.loading.tensor_checks import TensorChecks  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MASK = (1 << 64) - 1


def python_checksum(data: bytes) -> str:
    """The definition in naive.py's docstring, in Python integers."""
    data += bytes(-len(data) % naive.BLOCK_BYTES)
    a = b = 0
    for blk in range(len(data) // naive.BLOCK_BYTES):
        s = 0
        for j in range(naive.WORDS_PER_BLOCK):
            off = blk * naive.BLOCK_BYTES + 8 * j
            s += int.from_bytes(data[off:off + 8], "little", signed=True) * naive.MULTIPLIERS[j]
        a += s
        b += (blk + 1) * s
    return f"{a & MASK:016x}{b & MASK:016x}"


def _bytes_of(t: torch.Tensor) -> bytes:
    return naive.as_bytes(t).cpu().numpy().tobytes()


@pytest.mark.parametrize("nbytes", [0, 1, 7, 8, 4095, 4096, 4097, 3 * 4096 + 13])
def test_definition_matches_python_integers(nbytes: int) -> None:
    g = torch.Generator().manual_seed(nbytes)
    t = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    assert naive.checksum(t) == python_checksum(_bytes_of(t))
    assert len(set(naive.MULTIPLIERS)) == naive.WORDS_PER_BLOCK and all(m % 2 for m in naive.MULTIPLIERS)


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    unit = triton_checksum.UNIT_BLOCKS * naive.BLOCK_BYTES
    shapes = [((300, 1000), torch.bfloat16), ((7,), torch.float32), ((0,), torch.bfloat16),
              ((unit // 2 + 3,), torch.bfloat16), ((2 * unit // 4 + 512,), torch.float32),  # a unit and a tail
              ((4099,), torch.uint8), ((576, 64), torch.float8_e4m3fn), ((), torch.float32), ((5, 3), torch.int64)]
    out = []
    for shape, dtype in shapes:
        raw = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
        wide = torch.randn(shape, generator=g) * 10
        out.append(raw.view(torch.float8_e4m3fn) if dtype == torch.float8_e4m3fn else
                   raw.to(dtype) if dtype in (torch.uint8, torch.int64) else wide.to(dtype))
    big = torch.randn(4097, generator=g)
    out.append(big[1:])  # an address 4 bytes past alignment: the kernel sends it to the reference
    return [t.to(DEVICE) for t in out]


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_reference(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ops.FORCE_TRITON_ENV, "1")
    tensors = _tensors(seed)
    want = [naive.checksum(t) for t in tensors]
    assert triton_checksum.checksums(tensors) == want
    assert ops.checksums(tensors) == want
    assert ops.checksums(tensors[::-1]) == want[::-1]
    assert triton_checksum.checksums([]) == []


def test_table_launched_range_by_range_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table verification builds before a load, launched over ranges in any order (as tensors land), gives
    every tensor's checksum, the unaligned ones included."""
    monkeypatch.setenv(ops.FORCE_TRITON_ENV, "1")
    tensors = _tensors(2) + _tensors(3)
    table = ops.plan_checksums(tensors)
    assert isinstance(table, triton_checksum.ChecksumTable)
    cuts = [0, 3, 4, 9, len(tensors)]
    for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
        table.launch(lo, hi)
    assert table.result() == [naive.checksum(t) for t in tensors]


def test_table_planned_before_the_bytes_land(monkeypatch: pytest.MonkeyPatch) -> None:
    """A load plans the table while its parameters are still empty; the bytes written afterwards (the unaligned
    tensors' included, which the table copies into words only when the results are asked for) are what count."""
    monkeypatch.setenv(ops.FORCE_TRITON_ENV, "1")
    final = _tensors(5)
    dests = [torch.zeros_like(t) for t in final[:-1]]
    dests.append(torch.zeros(final[-1].numel() + 1, dtype=final[-1].dtype, device=DEVICE)[1:])  # unaligned too
    table = ops.plan_checksums(dests)
    for d, t in zip(dests, final):
        d.copy_(t)
    table.launch(0, len(dests))
    assert table.result() == [naive.checksum(t) for t in final]


def test_checks_launch_each_files_landed_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorChecks with the kernel (interpreted here) and tensors landing out of order across three files: each
    file's landed prefix is launched as it grows, the rest (a tensor never reported) at finish; a wrong checksum
    is named."""
    monkeypatch.setenv(ops.FORCE_TRITON_ENV, "1")
    dests = _tensors(4)
    per_file = [dests[:4], dests[4:7], dests[7:]]

    def jobs(wrong: str | None = None) -> list[FileJob]:
        out = []
        for f, ts in enumerate(per_file):
            segs, offset = [], 0
            for k, t in enumerate(ts):
                raw = naive.as_bytes(t)
                name = f"f{f}.t{k}"
                segs.append(Segment(name, offset, raw, "0" * 32 if name == wrong else naive.checksum(raw)))
                offset += -(-raw.numel() // 4096) * 4096
            out.append(FileJob(Path(f"part-{f}.safetensors"), offset, tuple(segs), "-"))
        return out

    # file 0's first tensor lands last: nothing of file 0 can launch before it; file 2's first is never reported
    # (a reader that cannot tell): all of file 2 is left to finish
    order = [(1, 0), (0, 1), (2, 1), (0, 2), (1, 1), (1, 2), (2, 2), (0, 3), (0, 0)]
    order += [(2, k) for k in range(3, len(per_file[2]))]
    for wrong in (None, "f1.t2"):
        checks = TensorChecks(jobs(wrong), DEVICE, batch_bytes=1, eager=True)
        try:
            for ids in order:
                checks.landed([ids])
            if wrong is None:
                checks.finish()
            else:
                with pytest.raises(ShardLoadError, match=r"verify: 1 tensor\(s\) differ .*'f1.t2'"):
                    checks.finish()
        finally:
            checks.close()
        assert checks.batches > 3


def test_detects_flips_and_moves() -> None:
    """Every single-bit flip, two exchanged 4 KiB blocks, two exchanged words of one block, a dropped last byte:
    each changes the checksum. (Trailing zero bytes do not: the length is checked apart, by shape and size.)"""
    g = torch.Generator().manual_seed(3)
    t = torch.randint(1, 256, (5 * naive.BLOCK_BYTES + 100,), dtype=torch.uint8, generator=g)
    base = naive.checksum(t)
    changed = []
    for pos in (0, 7, 8, 4095, 4096, 5 * naive.BLOCK_BYTES + 99):
        for bit in range(8):
            bad = t.clone()
            bad[pos] ^= 1 << bit
            changed.append(bad)
    blocks = t[:5 * naive.BLOCK_BYTES].view(5, -1)
    swapped = t.clone()
    swapped[:5 * naive.BLOCK_BYTES].view(5, -1)[[1, 3]] = blocks[[3, 1]]
    words = t.clone()
    words[0:8], words[8:16] = t[8:16].clone(), t[0:8].clone()
    changed += [swapped, words, t[:-1]]
    assert all(naive.checksum(c) != base for c in changed)
    assert naive.checksum(torch.cat([t, torch.zeros(3, dtype=torch.uint8)])) == base


def test_loader_verifies_loaded_tensors(sharded_bf16_tp1: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """verify on a version 2 output checks every loaded tensor (ops.checksums: the kernel on a GPU, the reference
    on CPU; the kernel agrees with the manifest on the small tensors here) and refuses a flipped byte naming the
    tensor; the detail reports the checksum time."""
    manifest = Manifest.load(sharded_bf16_tp1)
    entries = [t for f in manifest.rank(0, 0).files for t in f.tensors]
    small = {t.name for t in entries if t.nbytes < 64 << 10}  # the interpreter is slow: norms and biases

    def destinations() -> dict[str, torch.Tensor]:
        return {t.name: torch.full(t.shape, float("nan"), dtype=getattr(torch, t.dtype)) for t in entries}
    dest = destinations()
    report = load_rank(manifest, 0, 0, dest, LoadOptions(io="buffered", verify=True))
    assert report.verified and "checksum_s" in report.detail and report.detail["hash_s"] == 0
    assert "verify=on" in report.log_line()
    monkeypatch.setenv(ops.FORCE_TRITON_ENV, "1")
    assert ops.checksums([dest[n] for n in sorted(small)]) == [t.checksum for t in sorted(entries, key=lambda t: t.name)
                                                               if t.name in small]
    monkeypatch.delenv(ops.FORCE_TRITON_ENV)

    t = next(t for t in entries if t.nbytes > 8192)
    rel = next(f.path for f in manifest.rank(0, 0).files if t in f.tensors)
    bad = copy_folder(sharded_bf16_tp1, tmp_path / "flipped", real=(rel,))
    flip_byte(bad / rel, t.offset + 4097, 0x04)
    with pytest.raises(ShardLoadError, match=rf"verify: 1 tensor\(s\) differ from the manifest .*{t.name}"):
        load_rank(Manifest.load(bad), 0, 0, destinations(), LoadOptions(io="buffered", verify=True))


def _jobs(root: Path) -> tuple[Manifest, list]:
    manifest = Manifest.load(root)
    entries = [t for f in manifest.rank(0, 0).files for t in f.tensors]
    dest = {t.name: torch.full(t.shape, float("nan"), dtype=getattr(torch, t.dtype)) for t in entries}
    return manifest, plan_rank(manifest, root, 0, 0, dest)


def test_ring_reports_each_tensor_once_when_its_bytes_are_in_place(sharded_bf16_tp1: Path) -> None:
    """The ring tells ``landed`` about every tensor exactly once, and only once its bytes are final (what lets
    the checksums run while the load goes on); small chunks so tensors span several of them."""
    _, jobs = _jobs(sharded_bf16_tp1)
    files = [job.path.read_bytes() for job in jobs]
    seen: list[tuple[int, int]] = []
    wrong: list[str] = []
    lock = threading.Lock()

    def landed(ids: list[tuple[int, int]]) -> None:
        for j, k in ids:
            seg = jobs[j].segments[k]
            if seg.dest.numpy().tobytes() != files[j][seg.offset:seg.end]:
                wrong.append(seg.name)
        with lock:
            seen.extend(ids)

    opts = LoadOptions(io="buffered", chunk_mib=1, threads=3).ring()
    HostReader(dataclasses.replace(opts, chunk_bytes=64 << 10)).read(jobs, False, landed)
    assert not wrong
    assert sorted(seen) == [(j, k) for j, job in enumerate(jobs) for k in range(len(job.segments))]


def test_checks_launched_as_tensors_land_find_a_flipped_byte(sharded_bf16_tp1: Path, tmp_path: Path) -> None:
    """TensorChecks in its overlapped mode (the GPU default; here with the reference, in batches of 256 KiB):
    several batches start during the read, the rest at the end, and a flipped byte is named; a clean copy
    passes."""
    manifest, jobs = _jobs(sharded_bf16_tp1)
    reader = HostReader(LoadOptions(io="buffered", threads=2).ring())
    checks = TensorChecks(jobs, torch.device("cpu"), batch_bytes=256 << 10, eager=True)
    try:
        reader.read(jobs, False, checks.landed)
        checks.finish()
    finally:
        checks.close()
    assert checks.batches > 2

    t = next(t for f in manifest.rank(0, 0).files for t in f.tensors if t.nbytes > 8192)
    rel = next(f.path for f in manifest.rank(0, 0).files if t in f.tensors)
    bad = copy_folder(sharded_bf16_tp1, tmp_path / "flipped", real=(rel,))
    flip_byte(bad / rel, t.offset + 4097, 0x04)
    _, jobs = _jobs(bad)
    checks = TensorChecks(jobs, torch.device("cpu"), batch_bytes=256 << 10, eager=True)
    try:
        reader.read(jobs, False, checks.landed)
        with pytest.raises(ShardLoadError, match=rf"verify: 1 tensor\(s\) differ from the manifest .*{t.name}"):
            checks.finish()
    finally:
        checks.close()
