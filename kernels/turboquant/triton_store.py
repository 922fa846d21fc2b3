"""Triton quantize-and-store: scatter rotated, quantized, bit-packed K/V into the paged uint8 cache.

One launch stores K and V (grid axis 2). A program takes BLOCK_T tokens of one KV head of one of them as the model
wrote them and applies the calibration ``(x - mean) / scale`` and the float32 rotation (the reference's
operations, ``state.prepare_key/prepare_value`` and ``state.rotate``): tiles of tokens multiply by the dense matrix
``R^T`` in one dot, a one-token program (a decode step) applies its definition instead, signs and Walsh-Hadamard
transforms, with no matrix to load. Only the summation order differs from the reference, so a rotated coordinate
within float32 rounding of a decision threshold may take the adjacent code,
then computes the least-squares scale, the codes of each channel half and their packed words and writes them at
``slot_mapping`` (-1 = skip), in packing.py's layout. Fusing the first two steps replaced ~10 small torch kernels
per layer and step (~30 us of a 200 us decode layer at batch 32, H100 profile). Reference: ``naive.store``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_gds_plugin.kvcache import rotation
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
def _pow2(m):
    """quantizer.pow2_scale: exact powers of two (p, 1/p) with m * p in [1, 2), clamped to normal floats."""
    e = tl.minimum(tl.maximum((m.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1), 253)
    return ((254 - e) << 23).to(tl.float32, bitcast=True), (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _calibrated(x_rows, tmask, mean_ptr, scale_ptr, k, BF16_BITS: tl.constexpr):
    """Channels ``k`` of the rows as float32, calibrated. BF16_BITS: the rows are bf16 read as int16, widened in
    integers (exact everywhere; Triton's CPU interpreter rounds bf16 subnormals and the largest bf16s)."""
    x = tl.load(x_rows[:, None] + k[None, :], mask=tmask[:, None], other=0)
    if BF16_BITS:
        x = (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    return (x - tl.load(mean_ptr + k)[None, :]) / tl.load(scale_ptr + k)[None, :]


@triton.jit
def _times_rows(x, r, acc, BLOCK_T: tl.constexpr):
    """``acc + x @ r^T`` in float32 (x [BLOCK_T, K], r [N, K]): tl.dot for a tile of >= 16 tokens, else
    products summed per token (tl.dot takes no fewer than 16 rows)."""
    if BLOCK_T >= 16:
        return tl.dot(x, tl.trans(r), acc, input_precision="ieee")
    else:
        return acc + tl.sum(x[:, None, :] * r[None, :, :], axis=2)


@triton.jit
def _rotated_halves(x_rows, tmask, mean_ptr, scale_ptr, rot_ptr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_K: tl.constexpr, BF16_BITS: tl.constexpr):
    """The two channel halves of ``R (p x)`` in float32, ``x = (raw - mean) / scale`` the calibrated rows
    ``x_rows`` (pointers to one KV head of BLOCK_T tokens) and p the power of two that puts max |x| in [1, 2)
    (naive._encode says why), and 1/p. R's columns in blocks of BLOCK_K keep its tiles small for head_dim 256;
    the calibrated blocks are computed twice (max, then the products) instead of being held."""
    H: tl.constexpr = D // 2
    m = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in tl.static_range(0, D, BLOCK_K):
        x = _calibrated(x_rows, tmask, mean_ptr, scale_ptr, k0 + tl.arange(0, BLOCK_K), BF16_BITS)
        m = tl.maximum(m, tl.max(tl.abs(x), axis=1))
    p, unscale = _pow2(m)
    e = tl.arange(0, H)
    y0 = tl.zeros([BLOCK_T, H], dtype=tl.float32)
    y1 = tl.zeros([BLOCK_T, H], dtype=tl.float32)
    for k0 in tl.static_range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = _calibrated(x_rows, tmask, mean_ptr, scale_ptr, k, BF16_BITS) * p[:, None]
        y0 = _times_rows(x, tl.load(rot_ptr + e[:, None] * D + k[None, :]), y0, BLOCK_T)
        y1 = _times_rows(x, tl.load(rot_ptr + (H + e)[:, None] * D + k[None, :]), y1, BLOCK_T)
    return y0, y1, unscale


@triton.jit
def _sylvester(N: tl.constexpr):
    """The +-1 Sylvester-Hadamard matrix of order N <= 256, built in registers: entry (i, j) = (-1)^popcount(i & j)."""
    v = tl.arange(0, N)[:, None] & tl.arange(0, N)[None, :]
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return 1.0 - 2.0 * (v & 1).to(tl.float32)


@triton.jit
def _hadamard(x, BLOCK_T: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
    """``x @ H_D`` for rows ``x [BLOCK_T, D]``, H_D the unnormalized Sylvester-Hadamard matrix of D = A B: H_D is
    the Kronecker product H_A (x) H_B, so it is two small products over x viewed as [BLOCK_T, A, B] (A B (A + B)
    multiply-adds per row instead of D^2, and no matrix to load)."""
    x3 = tl.reshape(x, (BLOCK_T, A, B))
    y = tl.sum(x3[:, :, None, :] * _sylvester(B)[None, None, :, :], axis=3)  # along b
    z = tl.sum(_sylvester(A)[None, :, :, None] * y[:, None, :, :], axis=2)  # along a
    return tl.reshape(z, (BLOCK_T, A * B))


@triton.jit
def _hadamard_halves(x_rows, tmask, mean_ptr, scale_ptr, signs_ptr, rot_norm, D: tl.constexpr,
                     BLOCK_T: tl.constexpr, A: tl.constexpr, ROUNDS: tl.constexpr, BF16_BITS: tl.constexpr):
    """``_rotated_halves`` by the rotation's own definition (rotation.rotate: ROUNDS of random signs then a
    Walsh-Hadamard transform; ``rot_norm`` = D^(-ROUNDS/2), a power of two for two rounds) instead of its dense
    matrix, which each program of a decode step re-read from L2 (64 KiB at head_dim 128)."""
    H: tl.constexpr = D // 2
    d = tl.arange(0, D)
    x = _calibrated(x_rows, tmask, mean_ptr, scale_ptr, d, BF16_BITS)
    p, unscale = _pow2(tl.max(tl.abs(x), axis=1))
    x = x * p[:, None]
    for r in tl.static_range(ROUNDS):
        x = _hadamard(x * tl.load(signs_ptr + r * D + d)[None, :], BLOCK_T, A, D // A)
    y0, y1 = tl.split(tl.permute(tl.reshape(x * rot_norm, (BLOCK_T, 2, H)), (0, 2, 1)))
    return y0, y1, unscale


@triton.jit
def _store_tensor(
    x_ptr, stride_xt, stride_xh, mean_ptr, scale_ptr, stride_ch, rot_ptr, stride_rh, rot_norm,
    slot_ptr, cache_ptr, stride_cb, stride_cs, stride_ch_cache, block_size, bnd_ptr, table_ptr, T,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BF16_BITS: tl.constexpr, NLEV: tl.constexpr,
    BITS0: tl.constexpr, WORD0: tl.constexpr, BITS1: tl.constexpr, WORD1: tl.constexpr, NORM_WORD: tl.constexpr,
    NORM_HIGH: tl.constexpr, HADAMARD_A: tl.constexpr, ROUNDS: tl.constexpr,
):
    """BLOCK_T tokens of one KV head of one tensor (K or V): calibrate and rotate, least-squares scale, codes per
    half, packed words, bf16 scale into its half of the shared scale word. The rotation is the dense matrix at
    ``rot_ptr``, or with HADAMARD_A (a factor of D) its signs there, applied as Walsh-Hadamard transforms."""
    H: tl.constexpr = D // 2
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    tmask = t < T
    slot = tl.load(slot_ptr + t, mask=tmask, other=-1).to(tl.int64)
    valid = slot >= 0
    x_rows = x_ptr + t.to(tl.int64) * stride_xt + h * stride_xh
    if HADAMARD_A > 0:
        y0, y1, unscale = _hadamard_halves(x_rows, tmask, mean_ptr + h * stride_ch, scale_ptr + h * stride_ch,
                                           rot_ptr + h * stride_rh, rot_norm, D, BLOCK_T, HADAMARD_A, ROUNDS,
                                           BF16_BITS)
    else:
        y0, y1, unscale = _rotated_halves(x_rows, tmask, mean_ptr + h * stride_ch, scale_ptr + h * stride_ch,
                                          rot_ptr + h * stride_rh, D, BLOCK_T, BLOCK_K, BF16_BITS)
    # quantizer.pow2_scale: exact power-of-two normalization (max |y| -> [1, 2)) so that y*y neither overflows
    # (|y| ~ 1e30) nor underflows; it changes no bit of an ordinary vector's codes or scale.
    p, inv_p = _pow2(tl.maximum(tl.max(tl.abs(y0), axis=1), tl.max(tl.abs(y1), axis=1)))
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
    scale = tl.sqrt(D * 1.0) * dot / (tl.sum(c0 * c0, axis=1) + tl.sum(c1 * c1, axis=1)) * inv_p * unscale
    # Saturate a finite scale at the largest bf16 (it only goes past for a norm past the bf16 range; before the
    # NaN below: a GPU min/max would drop a NaN); +0 for a zero vector, as torch (the GPU sum of -0s gives -0).
    scale = tl.where(norm > 0, tl.minimum(tl.maximum(scale, -BF16_MAX), BF16_MAX), 0.0)
    scale = tl.where(norm < float("inf"), scale, float("nan"))  # False for +inf and NaN

    blk = slot // block_size
    base = cache_ptr + blk * stride_cb + (slot % block_size) * stride_cs + h * stride_ch_cache
    _store_half(code0, base, WORD0, H, BITS0, BLOCK_T, valid)
    _store_half(code1, base, WORD1, H, BITS1, BLOCK_T, valid)
    # fp32 -> bf16 with round-to-nearest-even done in integers: bit-identical to torch on every backend
    # (Triton's interpreter truncates in .to(tl.bfloat16)); NaN stays the canonical 0x7FC0.
    f = scale.to(tl.int32, bitcast=True)
    bits = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16) & 0xFFFF
    tl.store((base + NORM_WORD).to(tl.pointer_type(tl.int16)) + NORM_HIGH, bits.to(tl.int16), mask=valid)


@triton.jit(do_not_specialize=["T"])  # a per-batch count (as in triton_attention._attn_kernel)
def _quantize_store_kernel(
    k_ptr, stride_kt, stride_kh, v_ptr, stride_vt, stride_vh,  # K and V as the model wrote them [T, H, D]
    k_mean_ptr, k_scale_ptr, v_mean_ptr, v_scale_ptr, stride_ch,  # calibration [Hc, D] (stride 0: shared)
    rot_ptr, stride_rh, rot_norm,  # rotation [Hr, D, D], or its signs [Hr, ROUNDS, D] (stride 0: shared)
    slot_ptr, cache_ptr, stride_cb, stride_cs, stride_ch_cache, block_size,  # cache as int32 words
    k_bnd_ptr, k_table_ptr, v_bnd_ptr, v_table_ptr, T,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BF16_BITS: tl.constexpr, NLEV: tl.constexpr,
    K_BITS0: tl.constexpr, K_WORD0: tl.constexpr, K_BITS1: tl.constexpr, K_WORD1: tl.constexpr,
    K_NORM_WORD: tl.constexpr, K_NORM_HIGH: tl.constexpr,
    V_BITS0: tl.constexpr, V_WORD0: tl.constexpr, V_BITS1: tl.constexpr, V_WORD1: tl.constexpr,
    V_NORM_WORD: tl.constexpr, V_NORM_HIGH: tl.constexpr, HADAMARD_A: tl.constexpr, ROUNDS: tl.constexpr,
):
    """Grid (token tiles, KV heads, 2): axis 2 picks K or V, so both tensors are stored by one launch whose
    programs run side by side (two launches of a decode step's few programs each ran mostly on latency)."""
    if tl.program_id(2) == 0:
        _store_tensor(k_ptr, stride_kt, stride_kh, k_mean_ptr, k_scale_ptr, stride_ch, rot_ptr, stride_rh, rot_norm,
                      slot_ptr, cache_ptr, stride_cb, stride_cs, stride_ch_cache, block_size, k_bnd_ptr, k_table_ptr,
                      T, D, BLOCK_T, BLOCK_K, BF16_BITS, NLEV, K_BITS0, K_WORD0, K_BITS1, K_WORD1, K_NORM_WORD,
                      K_NORM_HIGH, HADAMARD_A, ROUNDS)
    else:
        _store_tensor(v_ptr, stride_vt, stride_vh, v_mean_ptr, v_scale_ptr, stride_ch, rot_ptr, stride_rh, rot_norm,
                      slot_ptr, cache_ptr, stride_cb, stride_cs, stride_ch_cache, block_size, v_bnd_ptr, v_table_ptr,
                      T, D, BLOCK_T, BLOCK_K, BF16_BITS, NLEV, V_BITS0, V_WORD0, V_BITS1, V_WORD1, V_NORM_WORD,
                      V_NORM_HIGH, HADAMARD_A, ROUNDS)


# On a GPU, fewer tokens than this are stored one per program (a decode step's few tokens per KV head: 16-token
# tiles gave a bs32 decode step 16 programs for the whole GPU; 34.2 -> 23.8 us per layer on the H100); more in
# 16-token tiles, whose tl.dot shares each rotation tile across the tokens (a one-token program applies the
# transform instead: _hadamard_halves). Triton's CPU interpreter runs programs one after another, so there tiles are
# always faster.
ONE_TOKEN_PROGRAMS_BELOW = 128
# A one-token program transforms a D-vector: with one warp every exchange is a shuffle (nvdisasm, Triton 3.6,
# sm_90, head_dim 128, the kernel's K and V branches together: 4,555 instructions per warp and 6 barriers, against
# 4 warps x 2,751 and 104 barriers with 4 warps). H100, bs32 @ 4K decode layer: 8.5 us per store vs 16.9 with the
# dense matrix (2026-12-07, docs/turboquant.md).
ONE_TOKEN_WARPS = 1


def _codec_args(prefix: str, codec: TensorCodec) -> dict[str, int]:
    (b0, w0), (b1, w1) = codec.halves()
    return {f"{prefix}_BITS0": b0, f"{prefix}_WORD0": w0, f"{prefix}_BITS1": b1, f"{prefix}_WORD1": w1,
            f"{prefix}_NORM_WORD": codec.norm_offset // 4, f"{prefix}_NORM_HIGH": codec.norm_offset % 4 // 2}


def _hadamard_factor(n: int) -> int:
    """A of n = A x B (A <= B, powers of two) for ``_hadamard``: 64 = 8 x 8, 128 = 8 x 16, 256 = 16 x 16."""
    return 1 << (n.bit_length() - 1) // 2


def _as_words(x: torch.Tensor) -> torch.Tensor:
    """bf16 rows go in as their int16 bits (``_calibrated`` widens them exactly)."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def store(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
          state: TurboQuantState, block_t: int | None = None) -> None:
    """Same contract as ``naive.store``; ``block_t`` (1 or a multiple of 16) overrides the tokens per program."""
    assert cache.dtype == torch.uint8 and cache.stride(3) == 1, "cache slots must be contiguous uint8 bytes"
    t, h, d = key.shape
    if t == 0:
        return
    assert key.stride(2) == 1 and value.stride(2) == 1, "head_dim must be contiguous"
    assert key.dtype == value.dtype and value.shape == key.shape
    if block_t is None:
        block_t = 1 if key.is_cuda and t < ONE_TOKEN_PROGRAMS_BELOW else 16
    words = cache.view(torch.int32)  # slots are whole words (quantizer.TurboQuantState.build)
    cal = state.calibration
    cal_rows = {(tuple(c.shape), c.stride(0)) for c in (cal.key_mean, cal.key_scale, cal.value_mean, cal.value_scale)}
    assert len(cal_rows) == 1, "one stride serves the four calibration tensors"
    # One token per program rotates by the transform itself; tiles share the dense matrix across their tokens' dot.
    one_token = block_t == 1
    rot = state.signs if one_token else state.rot
    _quantize_store_kernel[(triton.cdiv(t, block_t), h, 2)](
        _as_words(key), key.stride(0), key.stride(1), _as_words(value), value.stride(0), value.stride(1),
        cal.key_mean, cal.key_scale, cal.value_mean, cal.value_scale,
        0 if cal.key_mean.shape[0] == 1 else cal.key_mean.stride(0),
        rot, 0 if rot.shape[0] == 1 else rot.stride(0), float(d) ** (-rotation.ROUNDS / 2),
        slot_mapping, words, words.stride(0), words.stride(1), words.stride(2), words.shape[1],
        state.key.boundaries, state.key.group_table, state.value.boundaries, state.value.group_table, t,
        D=d, BLOCK_T=block_t, BLOCK_K=min(d, 32), BF16_BITS=key.dtype == torch.bfloat16, NLEV=MAX_LEVELS,
        **_codec_args("K", state.key), **_codec_args("V", state.value),
        HADAMARD_A=_hadamard_factor(d) if one_token else 0, ROUNDS=rotation.ROUNDS,
        num_warps=ONE_TOKEN_WARPS if one_token else 4,
    )
