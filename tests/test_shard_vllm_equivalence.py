"""Each rank's shard bytes == what vLLM's own DefaultModelLoader puts into that rank's parameters (before
process_weights_after_loading), for the real SmolLM2 model, bf16 and FP8 (per-tensor, block).

SmolLM2 has 9 query / 3 KV heads, so the multi-rank case is TP=3 (TP=2 is refused by vLLM: see
test_shard_refusals). The FP8 reference is vLLM's default loader reading the plain FP8 HF checkpoint that
write_fp8_checkpoint produces (the checkpoint a user would serve without the plugin).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vllm_gds_plugin.compat.model_build import RankSpec, default_loader_params
from vllm_gds_plugin.loading.fp8 import FP8Scheme
from vllm_gds_plugin.loading.manifest import ALIGNMENT, Manifest, rank_key
from vllm_gds_plugin.loading.sharder import ShardOptions, shard, write_fp8_checkpoint

pytestmark = pytest.mark.slow
# Block scheme: SmolLM2's merged qkv rows (576) are not a multiple of 128, which vLLM itself rejects for
# [128, 128]; [64, 128] is the largest block vLLM accepts for this model (and its CPU FP8 kernel needs K=128).
BLOCK = (64, 128)


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


@pytest.fixture(scope="module")
def fp8_checkpoints(model_path: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8ckpt")
    return {"per-tensor": write_fp8_checkpoint(model_path, root / "per-tensor", FP8Scheme.parse("per-tensor")),
            "block": write_fp8_checkpoint(model_path, root / "block", FP8Scheme.parse("block", BLOCK))}


@pytest.mark.parametrize("tp", [1, 3])
def test_bf16_shards_equal_vllm_default_loader(model_path: Path, tmp_path: Path, tp: int) -> None:
    out = tmp_path / "out"
    m = shard(ShardOptions(model_path, out, tensor_parallel_size=tp, quantization="none"))
    assert m.quantization.method == "none" and sorted(m.ranks) == [rank_key(0, t) for t in range(tp)]
    refs = [default_loader_params(model_path, RankSpec(t, tp), "bfloat16") for t in range(tp)]
    for t in range(tp):
        assert_rank_matches(out, m, t, refs[t])
    if tp > 1:  # the fake rank really is rank t: every rank got different slices of the same parameter
        name = "model.layers.0.self_attn.o_proj.weight"
        assert not torch.equal(refs[0][name], refs[1][name])
        # and vLLM's row-parallel slices, side by side, are the source tensor (sanity of the fake groups)
        with safe_open(str(next(model_path.glob("*.safetensors"))), framework="pt") as st:
            full = st.get_tensor(name)
        assert torch.equal(torch.cat([r[name] for r in refs], dim=1), full)


@pytest.mark.parametrize(("scheme", "tp"), [("per-tensor", 3), ("block", 1)])
def test_fp8_shards_equal_vllm_default_loader_on_fp8_checkpoint(model_path: Path, tmp_path: Path,
                                                                 fp8_checkpoints: dict[str, Path], scheme: str,
                                                                 tp: int) -> None:
    out = tmp_path / "out"
    m = shard(ShardOptions(model_path, out, tensor_parallel_size=tp, quantization="fp8", fp8_scheme=scheme,
                           fp8_block_size=BLOCK))
    assert (m.quantization.method, m.quantization.scheme) == ("fp8", scheme)
    ckpt = fp8_checkpoints[scheme]
    for t in range(tp):
        ref = default_loader_params(ckpt, RankSpec(t, tp), "bfloat16")
        assert any(v.dtype == torch.float8_e4m3fn for v in ref.values())
        assert_rank_matches(out, m, t, ref)
