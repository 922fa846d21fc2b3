"""The sharder's streaming writer: parameters written as they become final, possibly early (then rewritten) or
out of order, still give files whose bytes, safetensors header and recorded xxh3-128 match the final tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from vllm_gds_plugin.loading.manifest import ALIGNMENT, xxh3_128_file
from vllm_gds_plugin.loading.write_schedule import WriteSchedule
from vllm_gds_plugin.loading.writer import PATH_METADATA_KEY, Layout, PartFile, WriteQueue, spec_of


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(300, 7, generator=g).to(torch.bfloat16)),
            ("b.weight", torch.randn(5000, generator=g).to(torch.float8_e4m3fn)),
            ("b.weight_scale", torch.tensor(0.5)),
            ("c.weight", torch.randn(64, 64, generator=g)),
            ("d.bias", torch.arange(10, dtype=torch.int64))]


def _check(path: Path, rel: str, entry, tensors: dict[str, torch.Tensor]) -> None:
    assert entry.size == path.stat().st_size and entry.xxh3_128 == xxh3_128_file(path)
    with safe_open(str(path), framework="pt") as st:
        assert st.metadata() == {PATH_METADATA_KEY: rel}
        for e in entry.tensors:
            assert e.offset % ALIGNMENT == 0
            got, want = st.get_tensor(e.name), tensors[e.name]
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), e.name


def _run(tmp_path: Path, batches: list[set[str]], changes: dict[int, list[str]], limit: int = 1 << 30) -> int:
    """Load "batches" (each touching some tensors, changing the listed ones after a batch) through a
    WriteSchedule onto a PartFile on the writer thread; check the file; return the number of rewrites."""
    tensors = _tensors()
    final = dict(tensors)
    rel = "rank-pp0-tp0/part-0.safetensors"
    writer = WriteQueue()
    part = PartFile(tmp_path / "part-0.safetensors", rel, Layout.of([spec_of(n, t) for n, t in tensors],
                                                                    {PATH_METADATA_KEY: rel}), writer.hasher)
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


def test_in_order_streaming_needs_no_rewrite(tmp_path: Path) -> None:
    batches = [{"a.weight"}, {"b.weight", "b.weight_scale"}, {"c.weight"}, {"d.bias"}]
    assert _run(tmp_path, batches, {i: sorted(b) for i, b in enumerate(batches)}) == 0


def test_parameter_touched_again_is_rewritten(tmp_path: Path) -> None:
    # a.weight is loaded in batch 0, looks final after batch 1, is written, then batch 2 changes it again.
    batches = [{"a.weight"}, {"b.weight"}, {"a.weight", "c.weight"}, {"b.weight_scale", "d.bias"}]
    assert _run(tmp_path, batches, {0: ["a.weight"], 1: ["b.weight"], 2: ["a.weight", "c.weight"]}) == 1


def test_out_of_order_when_too_much_waits(tmp_path: Path) -> None:
    # a.weight (first in the file) is only final at the end; with a 0-byte limit the rest goes out first.
    batches = [{"b.weight", "b.weight_scale"}, {"c.weight"}, {"d.bias"}, {"a.weight"}]
    assert _run(tmp_path, batches, {0: ["b.weight"], 3: ["a.weight"]}, limit=0) == 0
