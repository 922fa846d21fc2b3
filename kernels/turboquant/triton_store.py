"""Triton quantize-and-store: scatter rotated, quantized, bit-packed K/V into the paged uint8 cache.

The calibration transform and the rotation are elementwise ops and one dense matmul in torch
(``state.prepare_key/prepare_value``, ``state.rotate``: the same float32 rotation as the reference, so the codes
are bit-exact); the kernel computes the least-squares scale, the codes of each channel half and their packed
words per (token tile, KV head) and writes them at ``slot_mapping`` (-1 = skip), in packing.py's layout.
Reference: ``naive.store``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_gds_plugin.kvcache.quantizer import BF16_MAX as _BF16_MAX, MAX_LEVELS, TensorCodec, TurboQuantState

BF16_MAX = tl.constexpr(_BF16_MAX)


@triton.jit
def _codes(u, bnd_ptr, FIRST: tl.constexpr, NLEV: tl.constexpr):
    """Codes of unit-variance values ``u`` of one channel half: the number of its decision thresholds below u
    (every channel of a half shares one codebook; thresholds are +inf past the half's levels)."""
    code = tl.zeros(u.shape, dtype=tl.int32)
    for i in tl.static_range(NLEV - 1):
        code += (u > tl.load(bnd_ptr + FIRST * (NLEV - 1) + i)).to(tl.int32)
    return code


@triton.jit
def _store_half(code, base, WORD: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr,
                valid):
    """Pack one half's codes ``[BLOCK_T, N]`` into its plane words at slot word WORD (packing.py's layout, which
    the attention kernel's register decoder reads back); disjoint bit fields, so sums are ORs."""
    if BITS == 4:  # channel 8 w + f -> word w, bit 4 f
        f = tl.reshape(code, (BLOCK_T, N // 8, 8)) << (4 * tl.arange(0, 8))[None, None, :]
        w = tl.arange(0, N // 8)
        tl.store(base[:, None] + WORD + w[None, :], tl.sum(f, axis=2), mask=valid[:, None])
    else:  # channel 16 w + 8 p + k -> low word w, bit 2 (2 k + p); high word w // 2, bit 4 k + 2 (w % 2) + p
        k = tl.arange(0, 8)[None, None, None, :]
        p = tl.arange(0, 2)[None, None, :, None]
        lo = tl.reshape(code & 3, (BLOCK_T, N // 16, 2, 8)) << (4 * k + 2 * p)
        w = tl.arange(0, N // 16)
        tl.store(base[:, None] + WORD + w[None, :], tl.sum(tl.sum(lo, axis=3), axis=2), mask=valid[:, None])
        if BITS == 3:  # channel 32 u + 16 q + 8 p + k, q = w % 2
            k5 = tl.arange(0, 8)[None, None, None, None, :]
            p5 = tl.arange(0, 2)[None, None, None, :, None]
            q5 = tl.arange(0, 2)[None, None, :, None, None]
            hi = tl.reshape(code >> 2, (BLOCK_T, N // 32, 2, 2, 8)) << (4 * k5 + 2 * q5 + p5)
            u = tl.arange(0, N // 32)
            tl.store(base[:, None] + WORD + N // 16 + u[None, :], tl.sum(tl.sum(tl.sum(hi, axis=4), axis=3), axis=2),
                     mask=valid[:, None])


@triton.jit
def _quantize_store_kernel(
    y_ptr, stride_yt, stride_yh,  # rotated float32 [T, H, D]
    slot_ptr, cache_ptr, stride_cb, stride_cs, stride_ch, block_size,  # cache as int32 words
    bnd_ptr, table_ptr, T,
    D: tl.constexpr, BLOCK_T: tl.constexpr, NLEV: tl.constexpr, BITS0: tl.constexpr, WORD0: tl.constexpr,
    BITS1: tl.constexpr, WORD1: tl.constexpr, NORM_WORD: tl.constexpr, NORM_HIGH: tl.constexpr,
):
    """One program = BLOCK_T tokens of one KV head: least-squares scale, codes per half, packed words, bf16 scale
    into its half of the shared scale word."""
    H: tl.constexpr = D // 2
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    tmask = t < T
    slot = tl.load(slot_ptr + t, mask=tmask, other=-1).to(tl.int64)
    valid = slot >= 0
    c = tl.arange(0, H)
    row = y_ptr + t.to(tl.int64) * stride_yt + h * stride_yh
    y0 = tl.load(row[:, None] + c[None, :], mask=tmask[:, None], other=0.0)
    y1 = tl.load(row[:, None] + H + c[None, :], mask=tmask[:, None], other=0.0)
    # quantizer.pow2_scale: exact power-of-two normalization (max |y| -> [1, 2)) so that y*y neither overflows
    # (|y| ~ 1e30) nor underflows; it changes no bit of an ordinary vector's codes or scale.
    m = tl.maximum(tl.max(tl.abs(y0), axis=1), tl.max(tl.abs(y1), axis=1))
    e = tl.minimum(tl.maximum((m.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1), 253)
    p = ((254 - e) << 23).to(tl.float32, bitcast=True)
    inv_p = (e << 23).to(tl.float32, bitcast=True)
    y0 = y0 * p[:, None]
    y1 = y1 * p[:, None]
    norm = tl.sqrt(tl.sum(y0 * y0, axis=1) + tl.sum(y1 * y1, axis=1))
    ok = (norm > 0) & (norm < float("inf"))  # zero and non-finite vectors get the codes of u = 0
    inv = tl.where(ok, tl.sqrt(D * 1.0) / norm, 0.0)
    code0 = _codes(tl.where(ok[:, None], y0 * inv[:, None], 0.0), bnd_ptr, 0, NLEV)
    code1 = _codes(tl.where(ok[:, None], y1 * inv[:, None], 0.0), bnd_ptr, H, NLEV)
    c0 = tl.load(table_ptr + code0)  # group_table: half g's centroids at [16 g, 16 g + 16)
    c1 = tl.load(table_ptr + NLEV + code1)
    dot = tl.sum(y0 * c0, axis=1) + tl.sum(y1 * c1, axis=1)
    scale = tl.sqrt(D * 1.0) * dot / (tl.sum(c0 * c0, axis=1) + tl.sum(c1 * c1, axis=1)) * inv_p
    # Saturate a finite scale at the largest bf16 (it only goes past for a norm past the bf16 range; before the
    # NaN below: a GPU min/max would drop a NaN); +0 for a zero vector, as torch (the GPU sum of -0s gives -0).
    scale = tl.where(norm > 0, tl.minimum(tl.maximum(scale, -BF16_MAX), BF16_MAX), 0.0)
    scale = tl.where(norm < float("inf"), scale, float("nan"))  # False for +inf and NaN

    blk = slot // block_size
    base = cache_ptr + blk * stride_cb + (slot % block_size) * stride_cs + h * stride_ch
    _store_half(code0, base, WORD0, H, BITS0, BLOCK_T, valid)
    _store_half(code1, base, WORD1, H, BITS1, BLOCK_T, valid)
    # fp32 -> bf16 with round-to-nearest-even done in integers: bit-identical to torch on every backend
    # (Triton's interpreter truncates in .to(tl.bfloat16)); NaN stays the canonical 0x7FC0.
    f = scale.to(tl.int32, bitcast=True)
    bits = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16) & 0xFFFF
    tl.store((base + NORM_WORD).to(tl.pointer_type(tl.int16)) + NORM_HIGH, bits.to(tl.int16), mask=valid)


def _store_one(y: torch.Tensor, words: torch.Tensor, slot_mapping: torch.Tensor, codec: TensorCodec) -> None:
    t, h, d = y.shape
    block_t = 4  # decode writes a few tokens per KV head: many small programs, not a few long ones
    (b0, w0), (b1, w1) = codec.halves()
    _quantize_store_kernel[(triton.cdiv(t, block_t), h)](
        y, y.stride(0), y.stride(1), slot_mapping, words, words.stride(0), words.stride(1), words.stride(2),
        words.shape[1], codec.boundaries, codec.group_table, t, D=d, BLOCK_T=block_t, NLEV=MAX_LEVELS,
        BITS0=b0, WORD0=w0, BITS1=b1, WORD1=w1, NORM_WORD=codec.norm_offset // 4, NORM_HIGH=codec.norm_offset % 4 // 2,
    )


def store(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
          state: TurboQuantState) -> None:
    """Same contract as ``naive.store``."""
    assert cache.dtype == torch.uint8 and cache.stride(3) == 1, "cache slots must be contiguous uint8 bytes"
    if key.shape[0] == 0:
        return
    words = cache.view(torch.int32)  # slots are whole words (quantizer.TurboQuantState.build)
    _store_one(state.rotate(state.prepare_key(key)).contiguous(), words, slot_mapping, state.key)
    _store_one(state.rotate(state.prepare_value(value)).contiguous(), words, slot_mapping, state.value)
