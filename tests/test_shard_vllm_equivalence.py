"""Each rank's shard bytes == what vLLM's own DefaultModelLoader puts into that rank's parameters (before
process_weights_after_loading), for the real SmolLM2 model, bf16 and FP8 (per-tensor, block).

SmolLM2 has 9 query / 3 KV heads, so the multi-rank case is TP=3 (TP=2 is refused by vLLM: see
test_shard_cli). The FP8 reference is vLLM's default loader reading the plain FP8 HF checkpoint that
write_fp8_checkpoint produces (the checkpoint a user would serve without the plugin). Outputs and references
are the session fixtures of shard_fixtures.py (shared with the loader tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shard_fixtures import FP8_TEST_BLOCK
from vllm_gds_plugin.loading.manifest import ALIGNMENT, Manifest, rank_key

pytestmark = pytest.mark.slow


def _raw(out: Path, path: str, offset: int, nbytes: int) -> bytes:
    with open(out / path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


def assert_rank_matches(out: Path, m: Manifest, tp_rank: int, expected: dict[str, torch.Tensor]) -> None:
    rank = m.rank(0, tp_rank)
    entries = rank.tensors()
    assert set(entries) == set(expected), f"rank {tp_rank}: names differ: {set(entries) ^ set(expected)}"
    for f in rank.files:
        with safe_open(str(out / f.path), framework="pt") as st:  # the files stay valid safetensors
            for t in f.tensors:
                assert t.offset % ALIGNMENT == 0
                ref = expected[t.name].contiguous()
                assert (tuple(ref.shape), str(ref.dtype)) == (t.shape, f"torch.{t.dtype}"), t.name
                raw = _raw(out, f.path, t.offset, t.nbytes)  # what the loader will read: manifest offsets
                assert raw == ref.reshape(-1).view(torch.uint8).numpy().tobytes(), f"rank {tp_rank} {t.name}"
                got = st.get_tensor(t.name).reshape(-1).view(torch.uint8)
                assert torch.equal(got, ref.reshape(-1).view(torch.uint8)), t.name


@pytest.mark.parametrize(("fixture", "tp"), [("sharded_bf16_tp1", 1), ("sharded_bf16_tp3", 3)])
def test_bf16_shards_equal_vllm_default_loader(request: pytest.FixtureRequest, model_path: Path,
                                               vllm_reference, fixture: str, tp: int) -> None:
    out = request.getfixturevalue(fixture)
    m = Manifest.load(out)
    assert m.quantization.method == "none" and sorted(m.ranks) == [rank_key(0, t) for t in range(tp)]
    refs = [vllm_reference(model_path, tp, t) for t in range(tp)]
    for t in range(tp):
        assert_rank_matches(out, m, t, refs[t])
    if tp > 1:  # the fake rank really is rank t: every rank got different slices of the same parameter
        name = "model.layers.0.self_attn.o_proj.weight"
        assert not torch.equal(refs[0][name], refs[1][name])
        # and vLLM's row-parallel slices, side by side, are the source tensor (sanity of the fake groups)
        with safe_open(str(next(model_path.glob("*.safetensors"))), framework="pt") as st:
            full = st.get_tensor(name)
        assert torch.equal(torch.cat([r[name] for r in refs], dim=1), full)


@pytest.mark.parametrize(("fixture", "scheme", "tp"), [("sharded_fp8_tp3", "per-tensor", 3),
                                                       ("sharded_fp8_block_tp1", "block", 1)])
def test_fp8_shards_equal_vllm_default_loader_on_fp8_checkpoint(request: pytest.FixtureRequest, fp8_checkpoint,
                                                                 vllm_reference, fixture: str, scheme: str,
                                                                 tp: int) -> None:
    out = request.getfixturevalue(fixture)
    m = Manifest.load(out)
    assert (m.quantization.method, m.quantization.scheme) == ("fp8", scheme)
    ckpt = fp8_checkpoint(scheme, FP8_TEST_BLOCK if scheme == "block" else None)
    for t in range(tp):
        ref = vllm_reference(ckpt, tp, t)
        assert any(v.dtype == torch.float8_e4m3fn for v in ref.values())
        assert_rank_matches(out, m, t, ref)
