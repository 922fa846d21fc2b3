"""The sharder's streaming writer: parameters written as they become final, possibly early (then rewritten) or
out of order, still give files whose bytes, safetensors header and recorded xxh3-128 match the final tensors,
through the page cache and with O_DIRECT (tensors whose memory is and is not 4 KiB-aligned, sizes that are and
are not whole blocks)."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

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


def _run(tmp_path: Path, batches: list[set[str]], changes: dict[int, list[str]], limit: int = 1 << 30,
         direct: bool = False) -> int:
    """Load "batches" (each touching some tensors, changing the listed ones after a batch) through a
    WriteSchedule onto a PartFile on the writer thread; check the file; return the number of rewrites."""
    tensors = _tensors()
    final = dict(tensors)
    rel = "rank-pp0-tp0/part-0.safetensors"
    writer = WriteQueue()
    part = PartFile(tmp_path / "part-0.safetensors", rel, Layout.of([spec_of(n, t) for n, t in tensors],
                                                                    {PATH_METADATA_KEY: rel}), writer.hasher,
                    direct=direct)
    # O_DIRECT where the file system takes it (tmpfs does not: then the buffered fallback is what runs)
    assert part.direct == (direct and _takes_o_direct(tmp_path))
    try:
        schedule = WriteSchedule(tensors, lambda n, t: writer.submit(part.write, n, t), out_of_order_bytes=limit)
        for i, touched in enumerate(batches):
            writer.drain()  # the earlier writes really happened before the tensors change below
            for name in changes.get(i, []):  # what load_weights does to the parameters of this batch
                final[name].reshape(-1).view(torch.uint8).add_(1)
            schedule.after_batch(touched)
        schedule.finish()
        entry = writer.submit(part.finish).result()
    finally:
        writer.close()
        part.abort()
    _check(tmp_path / "part-0.safetensors", rel, entry, final)
    return schedule.rewrites


DIRECT = pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])


@DIRECT
def test_in_order_streaming_needs_no_rewrite(tmp_path: Path, direct: bool) -> None:
    batches = [{"a.weight"}, {"b.weight", "b.weight_scale"}, {"c.weight"}, {"e.weight", "f.weight"}, {"d.bias"}]
    assert _run(tmp_path, batches, {i: sorted(b) for i, b in enumerate(batches)}, direct=direct) == 0


@DIRECT
def test_parameter_touched_again_is_rewritten(tmp_path: Path, direct: bool) -> None:
    # a.weight is loaded in batch 0, looks final after batch 1, is written, then batch 2 changes it again.
    batches = [{"a.weight"}, {"b.weight"}, {"a.weight", "c.weight"}, {"b.weight_scale", "d.bias"},
               {"e.weight", "f.weight"}]
    assert _run(tmp_path, batches, {0: ["a.weight"], 1: ["b.weight"], 2: ["a.weight", "c.weight"]},
                direct=direct) == 1


@DIRECT
def test_out_of_order_when_too_much_waits(tmp_path: Path, direct: bool) -> None:
    # a.weight (first in the file) is only final at the end; with a 0-byte limit the rest goes out first.
    batches = [{"b.weight", "b.weight_scale"}, {"c.weight"}, {"e.weight"}, {"f.weight", "d.bias"}, {"a.weight"}]
    assert _run(tmp_path, batches, {0: ["b.weight"], 3: ["a.weight", "f.weight"]}, limit=0, direct=direct) == 0
