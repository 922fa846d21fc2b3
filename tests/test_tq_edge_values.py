"""TurboQuant edge values: NaN/Inf, zero, subnormal and extreme-magnitude K/V vectors (docs/turboquant.md,
"Edge values"). Every case goes through the torch reference (naive.store) AND the Triton store kernel (compiled on
CUDA, TRITON_INTERPRET=1 on CPU, set up by test_tq_kernels), which must write identical bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from test_tq_kernels import DEVICE, assert_same_store, make_cache

from vllm_gds_plugin.kernels.turboquant import naive, triton_attention, triton_store
from vllm_gds_plugin.kvcache import rotation
from vllm_gds_plugin.kvcache.calibration import LayerCalibration
from vllm_gds_plugin.kvcache.packing import pack_codes
from vllm_gds_plugin.kvcache.presets import get_preset
from vllm_gds_plugin.kvcache.quantizer import TensorCodec, TurboQuantState

NAN_BITS, MAX_BITS = 0x7FC0, 0x7F7F  # canonical NaN and the largest finite bf16 (the saturated scale)
HEADS = 2

Builder = Callable[[torch.Tensor, torch.dtype], torch.Tensor]  # (an ordinary vector, dtype) -> edge vector


def _set(x: torch.Tensor, value: float, index: int | slice = 3) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


def _alternating(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(x, value) * torch.where(torch.arange(x.numel(), device=x.device) % 3 == 0, -1, 1)


def _subnormal(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.sign() * torch.finfo(dtype).tiny / 4 * (1 + torch.arange(x.numel(), device=x.device) % 3)


def _fmax(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


# name -> (builder, dtype -> expected field: "nan", "zero", "max" (saturated scale) or "finite" (finite positive
# scale, as accurate as at ordinary magnitude)). For uncalibrated states; calibration turns a zero input into
# -mean, which is ordinary.
EDGES: dict[str, tuple[Builder, Callable[[torch.dtype], str]]] = {
    "zero": (lambda x, dt: torch.zeros_like(x), lambda dt: "zero"),
    "neg_zero": (lambda x, dt: torch.full_like(x, -0.0), lambda dt: "zero"),
    "nan_one": (lambda x, dt: _set(x, math.nan), lambda dt: "nan"),
    "pinf_one": (lambda x, dt: _set(x, math.inf), lambda dt: "nan"),
    "ninf_one": (lambda x, dt: _set(x, -math.inf), lambda dt: "nan"),
    "nan_all": (lambda x, dt: torch.full_like(x, math.nan), lambda dt: "nan"),
    "pinf_all": (lambda x, dt: torch.full_like(x, math.inf), lambda dt: "nan"),
    "ninf_all": (lambda x, dt: torch.full_like(x, -math.inf), lambda dt: "nan"),
    "subnormal_all": (_subnormal, lambda dt: "finite"),
    "smallest_one": (lambda x, dt: _set(torch.zeros_like(x), -2.0 ** -24 if dt == torch.float16 else 2.0 ** -133),
                     lambda dt: "finite"),
    # One element ~1e38 (fp16: 65504) next to O(1) ones: codes of near-zero coordinates follow the small elements.
    "dominant_one": (lambda x, dt: _set(x, -min(_fmax(dt), 2.0 ** 126)), lambda dt: "finite"),
    # bf16: norm sqrt(2) * 3.39e38 is past the bf16 (and float32) range: the scale saturates.
    "max_two": (lambda x, dt: _set(x, _fmax(dt), slice(3, 5)), lambda dt: "finite" if dt == torch.float16 else "max"),
    # bf16: norm 8-16 x 3.39e38, past the bf16 range: the scale saturates (the rotation runs at max |x| ~ 1).
    "max_all": (lambda x, dt: _alternating(x, _fmax(dt)), lambda dt: "finite" if dt == torch.float16 else "max"),
    "huge": (lambda x, dt: x / x.abs().max() * (6e4 if dt == torch.float16 else 1e30), lambda dt: "finite"),
    "large_all": (lambda x, dt: _alternating(x, 1e37 if dt == torch.bfloat16 else 1e4), lambda dt: "finite"),
}


def calibration(head_dim: int, seed: int) -> LayerCalibration:
    """Per-head K and V means for HEADS heads; unit channel scales, as ``vllm-gds calibrate`` writes them (a
    scale < 1 would push the fp32-limit cases of EDGES past float32 in the calibrated vector: docs)."""
    g = torch.Generator().manual_seed(seed)
    one = torch.ones(HEADS, head_dim)
    return LayerCalibration(torch.randn(HEADS, head_dim, generator=g) * 5, one,
                            torch.randn(HEADS, head_dim, generator=g), one)


def field(codec: TensorCodec) -> tuple[slice, slice]:
    """Byte ranges (codes, bf16 scale) of K's or V's field in a slot."""
    return (slice(codec.code_offset, codec.code_offset + codec.code_bytes),
            slice(codec.norm_offset, codec.norm_offset + 2))


def zero_codes(codec: TensorCodec) -> torch.Tensor:
    """Packed codes of u = 0 in every channel: the level just below 0 (2^bits symmetric levels, the middle
    threshold is 0 and ``u > threshold`` is strict)."""
    codes = torch.cat([torch.full((n,), (1 << (bits - 1)) - 1) for _, n, bits in codec.split.groups(codec.head_dim)])
    return pack_codes(codes.view(1, -1), codec.split)[0].to(DEVICE)


def store_both(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
               state: TurboQuantState) -> torch.Tensor:
    """Store through the reference and the kernel (both launch shapes); they must agree on every byte (up to
    threshold ties: assert_same_store). Returns the reference's cache (so that the checks below see the same bytes
    on every machine; the kernel's equal them up to those ties)."""
    ref = cache.clone()
    naive.store(k, v, ref, slots, state)
    for block_t in (1, 16):  # one token per program (Walsh-Hadamard transforms) and tiles (the dense rotation)
        out = cache.clone()
        triton_store.store(k, v, out, slots, state, block_t=block_t)
        assert_same_store(out, ref, k, v, slots, state)
    return ref


def scale_bits(rows: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    """The bf16 scale bits (int32, 0..0xFFFF) of K's or V's field in slot rows ``[..., slot_bytes]``."""
    return rows[..., codec.norm_offset:codec.norm_offset + 2].contiguous().view(torch.int16).squeeze(-1).int() & 0xFFFF


def error_at_unit_magnitude(prepared: torch.Tensor, codec: TensorCodec, state: TurboQuantState) -> float:
    """Relative round-trip error of the same direction at ordinary magnitude (max |x| = 1): what an extreme
    vector's error is measured against."""
    unit = (prepared.double() / prepared.double().abs().max()).float().view(1, 1, -1)
    codes, scale = codec.quantize(state.rotate(unit))
    y = rotation.rotate(unit.double(), state.signs.double())
    return ((codec.dequantize(codes, scale.to(torch.bfloat16)).double() - y).norm() / y.norm()).item()


# A preset is a (K rate, V rate) pair and K and V fields are encoded independently: these six cover every rate
# (2, 2.5, 3, 3.5, 4 bits) on both K and V, the default and the three named presets. Each runs at three of the six
# (head_dim, dtype) combinations, each combination at three presets; every preset once calibrated.
PRESETS = ["turboquant", "3bit", "3.5bit", "4bit", "k2v3.5", "k2.5v2"]


def _store_cases() -> list:
    cases = []
    for i, preset in enumerate(PRESETS):
        combos = [(d, dt) for d in (64, 128, 256) for dt in (torch.float16, torch.bfloat16)
                  if (i + d // 64 + (dt == torch.float16)) % 2 == 0]
        for j, (d, dt) in enumerate(combos):
            calibrated = j == i % 3
            cases.append(pytest.param(preset, d, dt, calibrated,
                                      id=f"{preset}-{d}-{str(dt)[6:]}-{'calibrated' if calibrated else 'plain'}"))
    return cases


@pytest.mark.parametrize("preset,head_dim,dtype,calibrated", _store_cases())
def test_edge_vectors_store_defined_and_contained(preset: str, head_dim: int, dtype: torch.dtype,
                                                  calibrated: bool) -> None:
    """Each edge vector sits in K of head 0 and V of head 1 of its own token, between ordinary tokens: reference
    and kernel agree bit for bit, the edge fields hold what the docs promise, and every other byte (other tokens,
    the same token's other fields, slots not written, a -1 slot) is what storing without the edge vector gives."""
    cal = calibration(head_dim, seed=head_dim) if calibrated else None
    state = TurboQuantState.build(get_preset(preset), head_dim, 1, device=DEVICE, num_kv_heads=HEADS,
                                  calibration=cal)
    n = 2 * len(EDGES) + 1
    cache, block_table, slots, k, v = make_cache(state, [n], HEADS, seed=head_dim + len(preset))
    slots[-1] = -1
    k, v = k.to(dtype), v.to(dtype)
    clean = cache.clone()
    naive.store(k, v, clean, slots, state)
    edge_k, edge_v = k.clone(), v.clone()
    for i, (build, _) in enumerate(EDGES.values()):
        edge_k[2 * i + 1, 0] = build(k[2 * i + 1, 0].float(), dtype).to(dtype)
        edge_v[2 * i + 1, 1] = build(v[2 * i + 1, 1].float(), dtype).to(dtype)
    stored = store_both(edge_k, edge_v, cache, slots, state)

    rows = stored.view(-1, *stored.shape[2:])
    may_differ = torch.zeros_like(rows, dtype=torch.bool)
    rotated = naive.read_rotated(stored, block_table[0], n - 1, state)  # dequantized K, V [n - 1, HEADS, D]
    for i, (name, (_, expect)) in enumerate(EDGES.items()):
        t, slot = 2 * i + 1, int(slots[2 * i + 1])
        for tensor, codec, head, x in ((0, state.key, 0, edge_k), (1, state.value, 1, edge_v)):
            code_bytes, scale_bytes = field(codec)
            may_differ[slot, head, code_bytes] = may_differ[slot, head, scale_bytes] = True
            codes, bits = rows[slot, head, code_bytes], int(scale_bits(rows[slot, head], codec))
            want = "finite" if calibrated and expect(dtype) == "zero" else expect(dtype)
            if want in ("nan", "zero"):
                assert bits == (NAN_BITS if want == "nan" else 0) and torch.equal(codes, zero_codes(codec)), name
            elif want == "max":
                assert bits == MAX_BITS, (name, hex(bits))
            else:
                assert 0 < bits < 0x7F80, (name, hex(bits))  # positive, finite (below +Inf), nonzero
                prepared = (state.prepare_value if tensor else state.prepare_key)(x[t:t + 1])[0, head]
                y = rotation.rotate(prepared.double().view(1, -1), state.signs.double())[0]
                err = ((rotated[tensor][t, head].double() - y).norm() / y.norm()).item()
                # As accurate as at ordinary magnitude, up to one step of a subnormal bf16 scale (2^-133).
                scale = torch.tensor([bits], dtype=torch.int16).view(torch.bfloat16).item()
                assert err <= error_at_unit_magnitude(prepared, codec, state) + 0.01 + 2.0 ** -133 / scale, (name, err)
    assert torch.equal(rows[~may_differ], clean.view(-1, *clean.shape[2:])[~may_differ])


@pytest.mark.parametrize("preset,head_dim", [("turboquant", 128), ("k2.5v3.5", 256), ("3bit", 64)])
@pytest.mark.parametrize("dtype,exponent", [(torch.bfloat16, 100), (torch.bfloat16, -100), (torch.float16, 12)],
                         ids=["bf16-x2^100", "bf16-x2^-100", "fp16-x2^12"])
def test_power_of_two_magnitudes_store_identical_codes(preset: str, head_dim: int, dtype: torch.dtype,
                                                       exponent: int) -> None:
    """x * 2^e (1e30 or 1e-30 in bf16, up to 65504 in fp16) stores exactly x's codes and x's scale times 2^e:
    extreme magnitudes are quantized exactly as well as ordinary ones, in both paths."""
    state = TurboQuantState.build(get_preset(preset), head_dim, 2, device=DEVICE)
    cache, _, slots, _, _ = make_cache(state, [6], 1, seed=head_dim)
    g = torch.Generator().manual_seed(exponent + head_dim)
    k, v = (torch.randn(6, 1, head_dim, generator=g).clamp(-15, 15).to(dtype).to(DEVICE) for _ in range(2))
    big_k, big_v = k * 2.0 ** exponent, v * 2.0 ** exponent
    assert torch.equal(big_k.float() * 2.0 ** -exponent, k.float())  # the input itself is exact
    base = store_both(k, v, cache, slots, state).view(-1, state.slot_bytes)[slots]
    scaled = store_both(big_k, big_v, cache, slots, state).view(-1, state.slot_bytes)[slots]
    for codec in (state.key, state.value):
        lo = codec.code_offset
        assert torch.equal(scaled[:, lo:lo + codec.code_bytes], base[:, lo:lo + codec.code_bytes])
        assert torch.equal(scale_bits(scaled, codec), scale_bits(base, codec) + (exponent << 7))  # bf16 exponent


@pytest.mark.parametrize("tensor,value", [("key", math.nan), ("key", math.inf), ("value", -math.inf),
                                          ("value", math.nan), ("key", 2.0 ** 100), ("value", -(2.0 ** 100))],
                         ids=["key-nan", "key-inf", "value-neginf", "value-nan", "key-2^100", "value--2^100"])
@pytest.mark.parametrize("attention", [naive.attention, triton_attention.attention], ids=["reference", "triton"])
def test_attention_reaches_exactly_the_queries_that_see_the_token(tensor: str, value: float,
                                                                  attention: Callable) -> None:
    """A non-finite element in one token's K or V (one KV head) makes NaN exactly the outputs of the query heads of
    that KV head whose queries can see the token; every other output (other sequence, other KV head, earlier
    queries of the same prefill chunk) is bit-identical to the cache without it. A finite 1e30 element gives
    finite outputs everywhere."""
    ratio, lens, qlens, bad = 2, [12, 9], [6, 1], 8  # seq 0: queries at positions 6..11, bad token at 8
    state = TurboQuantState.build(get_preset("turboquant"), 64, 0, device=DEVICE, num_kv_heads=HEADS)
    cache, block_table, slots, k, v = make_cache(state, lens, HEADS, seed=21)
    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
    clean = cache.clone()
    naive.store(k, v, clean, slots, state)
    k, v = k.clone(), v.clone()
    (k if tensor == "key" else v)[bad, 0, 5] = value
    poisoned = store_both(k, v, cache, slots, state)
    qsl = torch.tensor([0, *qlens]).cumsum(0).int().to(DEVICE)
    q = torch.randn(sum(qlens), HEADS * ratio, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want = attention(q, clean, block_table, seq_lens, qsl, 0.125, state)
    got = attention(q, poisoned, block_table, seq_lens, qsl, 0.125, state)
    sees = torch.zeros(got.shape[:2], dtype=torch.bool, device=DEVICE)
    sees[bad - (lens[0] - qlens[0]):qlens[0], :ratio] = True  # seq 0 queries at positions >= bad, KV head 0
    if math.isfinite(value):
        assert torch.isfinite(got).all()
    else:
        assert got[sees].isnan().all()
    assert torch.equal(got[~sees], want[~sees])
