"""The sharder's streaming writer: parameters written as they become final, in file order or out of order, give
files whose bytes, safetensors header, recorded xxh3-128 and per-tensor checksums match the tensors, through the page cache and with
O_DIRECT (tensors whose memory is and is not 4 KiB-aligned, sizes that are and are not whole blocks), written on
the ordered writer thread itself or several at once on I/O threads, and each tensor's memory is released only after
its write and hash."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vllm_gds_plugin.kernels.checksum import naive
from vllm_gds_plugin.loading.manifest import ALIGNMENT, xxh3_128_file
from vllm_gds_plugin.loading.write_schedule import WriteSchedule
from vllm_gds_plugin.loading.writer import PATH_METADATA_KEY, Layout, PartFile, WriteQueue, spec_of


def _page_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into page-aligned memory (an anonymous map), as large allocations often are."""
    buf = torch.frombuffer(mmap.mmap(-1, t.nbytes), dtype=torch.uint8)
    buf.copy_(t.reshape(-1).view(torch.uint8))
    return buf.view(t.dtype).view(t.shape)


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    odd = torch.randn(3 * 4096 + 1, generator=g).to(torch.bfloat16)[1:]  # memory 2 bytes off any alignment
    return [("a.weight", torch.randn(300, 7, generator=g).to(torch.bfloat16)),
            ("b.weight", torch.randn(5000, generator=g).to(torch.float8_e4m3fn)),
            ("b.weight_scale", torch.tensor(0.5)),
            ("c.weight", _page_aligned(torch.randn(64, 64, generator=g))),  # 16 KiB: whole blocks
            ("e.weight", _page_aligned(torch.randn(3000, 3, generator=g))),  # blocks and a partial block
            ("f.weight", odd.view(64, 192)),
            ("d.bias", torch.arange(10, dtype=torch.int64))]


def _takes_o_direct(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as e:
        assert e.errno == errno.EINVAL
        return False
    finally:
        (folder / "probe").unlink(missing_ok=True)
    return True


def _check(path: Path, rel: str, entry, tensors: dict[str, torch.Tensor]) -> None:
    assert entry.size == path.stat().st_size and entry.xxh3_128 == xxh3_128_file(path)
    with safe_open(str(path), framework="pt") as st:
        assert st.metadata() == {PATH_METADATA_KEY: rel}
        for e in entry.tensors:
            assert e.offset % ALIGNMENT == 0
            got, want = st.get_tensor(e.name), tensors[e.name]
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), e.name
            assert e.checksum == naive.checksum(got) == naive.checksum(want), e.name


def _run(tmp_path: Path, finals: list[list[str]], limit: int = 1 << 30, direct: bool = False,
         io_threads: int = 0) -> list[str]:
    """Declare tensors final in the given steps through a WriteSchedule onto a PartFile on the writer thread
    (its writes on ``io_threads`` I/O threads; 0: on the writer thread), each write releasing its tensor's memory
    (``on_done``) as the sharder's parameter pool does; check the file; return the order in which tensors were
    written."""
    tensors = _tensors()
    final = dict(tensors)
    rel = "rank-pp0-tp0/part-0.safetensors"
    writer = WriteQueue(max(io_threads, 1))
    part = PartFile(tmp_path / "part-0.safetensors", rel, Layout.of([spec_of(n, t) for n, t in tensors],
                                                                    {PATH_METADATA_KEY: rel}), writer.hashing,
                    direct=direct, io=writer.io if io_threads else None)
    # O_DIRECT where the file system takes it (tmpfs does not: then the buffered fallback is what runs)
    assert part.direct == (direct and _takes_o_direct(tmp_path))
    written, released = [], []
    try:
        def submit(name: str) -> None:
            written.append(name)
            writer.submit(part.write, name, final[name], lambda: released.append(name))

        schedule = WriteSchedule([(n, t.nbytes) for n, t in tensors], submit, out_of_order_bytes=limit)
        for names in finals:
            schedule.final(names)
        schedule.finish()
        entry = writer.submit(part.finish).result()
    finally:
        writer.close()
        part.abort()
    _check(tmp_path / "part-0.safetensors", rel, entry, final)
    # every tensor's memory is handed back once, after its own write, hash and checksum (the file hash and the
    # checksums run on threads of their own, and the later of the two hands it back: not necessarily in write order)
    assert sorted(released) == sorted(written) and len(released) == len(set(released))
    return written


DIRECT = pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
IO = pytest.mark.parametrize("io_threads", [0, 3], ids=["writer_thread", "io_threads"])
NAMES = [n for n, _ in _tensors()]


@DIRECT
@IO
def test_written_in_file_order_when_final_in_order(tmp_path: Path, direct: bool, io_threads: int) -> None:
    assert _run(tmp_path, [[n] for n in NAMES], direct=direct, io_threads=io_threads) == NAMES


@DIRECT
@IO
def test_waits_for_the_next_in_file_order(tmp_path: Path, direct: bool, io_threads: int) -> None:
    # a.weight (first in the file) is final last: nothing goes out before it under a large limit
    assert _run(tmp_path, [NAMES[1:4], NAMES[4:], ["a.weight"]], direct=direct, io_threads=io_threads) == NAMES


@DIRECT
@IO
def test_out_of_order_when_too_much_waits(tmp_path: Path, direct: bool, io_threads: int) -> None:
    # with a 0-byte limit the final tensors behind a.weight go out first (the file is re-hashed at finish)
    assert _run(tmp_path, [NAMES[1:3], NAMES[3:], ["a.weight"]], limit=0, direct=direct,
                io_threads=io_threads) == NAMES[1:] + NAMES[:1]
