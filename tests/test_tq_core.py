"""TurboQuant core (torch side): presets and slot sizes, codebooks vs theory, rotation, bit packing, quantizer."""

from __future__ import annotations

import pytest
import torch

from vllm_gds_plugin.kvcache import rotation
from vllm_gds_plugin.kvcache.codebooks import CENTROIDS, D_MSE
from vllm_gds_plugin.kvcache.gen_codebooks import lloyd_max
from vllm_gds_plugin.kvcache.packing import pack_codes, unpack_codes
from vllm_gds_plugin.kvcache.presets import ChannelSplit, TurboQuantConfigError, get_preset, preset_names
from vllm_gds_plugin.kvcache.quantizer import TensorCodec, TurboQuantState

PAPER_D_MSE = {1: 0.36, 2: 0.117, 3: 0.030, 4: 0.009}


@pytest.mark.parametrize("name,head_dim,expected", [
    ("3.5bit", 128, 116), ("turboquant", 128, 116), ("3bit", 128, 100), ("4bit", 128, 132),
    ("3bit", 64, 52), ("3.5bit", 64, 60), ("k4v3", 256, 228),
])
def test_slot_bytes(name: str, head_dim: int, expected: int) -> None:
    assert get_preset(name).slot_bytes(head_dim) == expected
    state = TurboQuantState.build(get_preset(name), head_dim, 0)
    assert state.slot_bytes == expected


def test_default_is_3_5_bits_and_names() -> None:
    assert get_preset("turboquant").avg_bits == 3.5
    for required in ("turboquant", "3bit", "3.5bit", "4bit", "k4v3", "k3v4"):
        assert required in preset_names()
    with pytest.raises(TurboQuantConfigError, match="valid: turboquant, .*k4v3"):
        get_preset("turboquant_4bit")
    with pytest.raises(ValueError, match="head_dim"):
        get_preset("3bit").slot_bytes(96)


def test_codebooks_regenerate_and_match_theory() -> None:
    # The stored constants are what the generator produces (spot check, the full run takes seconds).
    centroids, mse = lloyd_max(128, 3)
    assert centroids.tolist() == pytest.approx(CENTROIDS[128][3], abs=1e-7)
    assert mse == pytest.approx(D_MSE[128][3], rel=1e-5)
    for bits in (1, 2, 4):  # the paper's rounded D_mse; its 3-bit "0.03" rounds the exact 0.0340 down 12%
        assert D_MSE[128][bits] == pytest.approx(PAPER_D_MSE[bits], rel=0.05)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_empirical_mse_on_unit_vectors(head_dim: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1500, 1, head_dim, generator=g)
    x = x / x.norm(dim=-1, keepdim=True)
    signs = rotation.random_signs(7, 0, 1, head_dim)
    for bits in (1, 2, 3, 4):
        split = ChannelSplit(bits, bits, 0.0)
        codec = TensorCodec.build(split, head_dim, 0, split.code_bytes(head_dim), torch.device("cpu"))
        codes, scale = codec.quantize(rotation.rotate(x, signs))
        x_hat = rotation.unrotate(codec.dequantize(codes, scale), signs)
        mse = ((x - x_hat) ** 2).sum(-1).mean().item()
        # Least-squares scale can only lower the error; it stays within 5% of D_mse.
        assert D_MSE[head_dim][bits] * 0.95 <= mse <= D_MSE[head_dim][bits] * 1.02, (bits, mse)


def test_rotation_orthogonal_reproducible_and_matches_dense() -> None:
    s1 = rotation.random_signs(3, 5, 2, 128)
    assert torch.equal(s1, rotation.random_signs(3, 5, 2, 128))
    assert not torch.equal(s1, rotation.random_signs(3, 6, 2, 128))
    assert not torch.equal(s1[0], s1[1])
    r = rotation.rotation_matrix(s1)
    assert torch.allclose(r[0] @ r[0].T, torch.eye(128), atol=1e-5)
    x = torch.randn(9, 2, 128)
    assert torch.allclose(rotation.rotate(x, s1), torch.einsum("thd,hed->the", x, r), atol=1e-5)
    assert torch.allclose(rotation.unrotate(rotation.rotate(x, s1), s1), x, atol=1e-5)


@pytest.mark.parametrize("rate", ["2", "2.5", "3", "3.5", "4"])
@pytest.mark.parametrize("head_dim", [64, 256])
def test_packing_round_trip_no_wasted_bits(rate: str, head_dim: int) -> None:
    split = ChannelSplit.from_rate(rate)
    limits = torch.tensor([1 << b for _, n, b in split.groups(head_dim) for _ in range(n)])
    codes = (torch.rand(5, 3, head_dim) * limits).long()
    packed = pack_codes(codes, split)
    assert packed.dtype == torch.uint8 and packed.shape[-1] * 8 == round(float(rate) * head_dim)
    assert torch.equal(unpack_codes(packed, split, head_dim), codes)


def test_three_bit_layout_eight_values_in_three_bytes() -> None:
    # head_dim 64 = two halves of 32 channels, each a 2-bit low plane of 2 words then a 1-bit high plane of 1 word
    # (packing.py: channel 16 w + 8 p + k -> low word w at bit 2 (2 k + p), high bit at 4 k + 2 (w % 2) + p).
    # Channel c holds its k = c % 8.
    codes = (torch.arange(64) % 8).view(1, 64)
    packed = pack_codes(codes, ChannelSplit(3, 3, 0.0))
    assert packed.shape[-1] == 24
    # low bits of k = 0, 0, 1, 1 (k = 0 for p = 0 and 1, then k = 1) in the first byte
    assert packed[0, 0].item() == 0b01010000
    # high bit set for k = 4..7: nibbles 4..7 of the high word (its bytes 2 and 3), the same in both halves
    assert packed[0, 8:12].tolist() == [0, 0, 255, 255] and torch.equal(packed[0, :12], packed[0, 12:])


def test_state_reproducible_and_per_head() -> None:
    preset = get_preset("turboquant")
    a = TurboQuantState.build(preset, 64, 4, seed=11)
    b = TurboQuantState.build(preset, 64, 4, seed=11)
    assert torch.equal(a.rot, b.rot) and torch.equal(a.key.group_table, b.key.group_table)
    assert a.rot.shape == (1, 64, 64)
    from dataclasses import replace

    per_head = TurboQuantState.build(replace(preset, per_head_rotation=True), 64, 4, seed=11, num_kv_heads=3)
    assert per_head.rot.shape == (3, 64, 64) and not torch.equal(per_head.rot[0], per_head.rot[1])


def test_calibrate_command_on_real_model_round_trips(tmp_path) -> None:
    """``vllm-gds calibrate`` on the real SmolLM2 over real text: a loadable file whose key centers carry real
    energy, sliced per tensor-parallel rank; damaged or mismatched files are refused by name."""
    import argparse

    from vllm_gds_plugin.assets import model_dir
    from vllm_gds_plugin.kvcache import commands
    from vllm_gds_plugin.kvcache.calibration import (
        CALIBRATION_FILE,
        TurboQuantCalibration,
        TurboQuantCalibrationError,
        find_calibration,
    )

    parser = argparse.ArgumentParser()
    commands.add_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / CALIBRATION_FILE
    args = parser.parse_args(["calibrate", str(model_dir()), "--tokens", "256", "--window", "128",
                              "--output", str(out)])
    assert args.func(args) == 0
    cal = find_calibration(tmp_path)
    assert cal is not None and cal.shape == (30, 3, 64) and cal.tokens == 256 and "lee_background" in cal.source
    assert cal.key_mean.norm(dim=-1).min() > 0.5  # SmolLM2's keys have a large common component in every head
    part = cal.layer(7, slice(1, 3))
    assert part.key_mean.shape == (2, 64) and torch.equal(part.value_mean, cal.value_mean[7, 1:3])
    state = TurboQuantState.build(get_preset("turboquant"), 64, 7, num_kv_heads=2, calibration=part)
    assert torch.equal(state.calibration.key_mean, cal.key_mean[7, 1:3])
    with pytest.raises(TurboQuantCalibrationError, match="expected \\(3, 64\\)"):
        TurboQuantState.build(get_preset("turboquant"), 64, 7, num_kv_heads=3, calibration=part)
    with pytest.raises(TurboQuantCalibrationError, match="30 layers"):
        cal.layer(30)
    bad = TurboQuantCalibration(cal.key_mean, -cal.key_scale, cal.value_mean, cal.value_scale, 1, "x")
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(TurboQuantCalibrationError, match="bad.safetensors layer 0: calibration key_scale"):
        TurboQuantCalibration.load(tmp_path / "bad.safetensors")
    assert find_calibration(tmp_path / "missing") is None
