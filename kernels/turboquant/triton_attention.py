"""Triton attention over the TurboQuant paged cache: decode and multi-token queries, split-KV + reduction.

One program = (query block of one sequence, KV head, KV split). Its rows are BLOCK_Q query tokens x the G query
heads of that KV head, so every K/V tile is read and dequantized ONCE for the whole GQA group, into registers
only, then fed to ``tl.dot`` (tensor cores). Everything is in the rotated domain: q is calibrated and rotated
once up front (``_query_kernel``), P·V accumulates rotated values, and ``_merge_unrotate`` merges the KV splits,
un-rotates once and applies the calibration's value scale and mean, so the KV loop never touches a rotation and
nothing writes a dequantized cache. Decode runs the merge in the last-ending program of each (sequence, KV head),
multi-token queries in ``_finish_kernel``: two or three launches per call. The scale of each K/V vector is pulled out
of the dot products (logits *= s_k; P *= s_v), so the tiles fed to tl.dot are bare codebook values. Slots are
read as aligned int32 words only (layout: kvcache/packing.py). A pure decode batch runs one program per
(sequence, KV head, split), so no program is launched empty.
Grids depend only on tensor shapes (CUDA-graph safe, no host syncs). Reference: ``naive.attention``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_gds_plugin.kernels.turboquant import lut
from vllm_gds_plugin.kvcache.quantizer import TensorCodec, TurboQuantState, e4m3_codebook


# Inline-PTX constraints (lut.py), as constexpr globals so the jitted code may read them.
_CONSTRAINTS_4BIT: tl.constexpr = tl.constexpr(lut.CONSTRAINTS_4BIT)
_CONSTRAINTS_PLANES: tl.constexpr = tl.constexpr(lut.CONSTRAINTS_PLANES)


@triton.jit
def _join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """[..., 2, 2, 2] whose row-major element f is v_f (tl.join appends its axis, so the last join is the
    fastest-varying bit of f)."""
    return tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))


@triton.jit
def _half_words(rows, n_ok, WORD: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """The packed words of one half of K or V for BLOCK_N slots: N channels at BITS bits whose planes start at
    slot word WORD (packing.py: a 4-bit plane, or a 2-bit low plane + a 1-bit high plane). Returns (plane words,
    high-plane words); a 4-bit half has one plane, returned twice."""
    if BITS == 4:
        w = tl.load(rows[:, None] + WORD + tl.arange(0, N // 8)[None, :], mask=n_ok[:, None], other=0)
        return w, w
    else:  # (the compiler checks every return of a function against the others, even a constexpr-dead one)
        NW: tl.constexpr = N // 16  # words of the 2-bit plane; channel 16 w + 8 p + k
        wi = tl.arange(0, NW)
        lo = tl.load(rows[:, None] + WORD + wi[None, :], mask=n_ok[:, None], other=0)
        if BITS == 3:  # high bits of channels 16 w + 8 p + k: word w // 2 of the 1-bit plane
            # (loaded once and repeated in registers: a load of repeated addresses gets a token-major layout,
            # which sends every value through shared memory 16 bits at a time)
            hw = tl.load(rows[:, None] + WORD + NW + tl.arange(0, NW // 2)[None, :], mask=n_ok[:, None], other=0)
            hi = tl.reshape(tl.join(hw, hw), (hw.shape[0], NW))
        else:
            hi = tl.zeros_like(lo)
        return lo, hi


@triton.jit
def _half_values(lo, hi, table_ptr, N: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 ASM: tl.constexpr, DTYPE: tl.constexpr):
    """Codebook values [BLOCK_N, N] (unit-variance units, as DTYPE) of one half from its words (``_half_words``).
    With ASM (lut.py) each word becomes 8 values in registers; otherwise (CPU interpreter, fp32 dots) codes are
    cut out with shifts and looked up in the float32 table at ``table_ptr``."""
    if BITS == 4:
        if ASM != "":
            v = tl.inline_asm_elementwise(ASM, _CONSTRAINTS_4BIT, [lo], dtype=(tl.int16, ) * 8, is_pure=True, pack=1)
            return tl.reshape(_join8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]), (BLOCK_N, N)).to(
                DTYPE, bitcast=True)
        code = (lo[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15  # [BN, word, nibble]
    else:
        NW: tl.constexpr = N // 16
        hi_shift = 2 * (tl.arange(0, NW) % 2)  # + p
        if ASM != "":
            v = tl.inline_asm_elementwise(ASM, _CONSTRAINTS_PLANES,
                                          [lo, hi, tl.broadcast_to(hi_shift[None, :], (BLOCK_N, NW))],
                                          dtype=(tl.int16, ) * 16, is_pure=True, pack=1)
            vals = tl.join(_join8(v[0], v[2], v[4], v[6], v[8], v[10], v[12], v[14]),
                           _join8(v[1], v[3], v[5], v[7], v[9], v[11], v[13], v[15]))
            return tl.reshape(vals, (BLOCK_N, N)).to(DTYPE, bitcast=True)
        p = tl.arange(0, 2)[None, None, :, None]
        k = tl.arange(0, 8)[None, None, None, :]
        code = ((lo[:, :, None, None] >> (4 * k + 2 * p)) & 3) | \
            (((hi[:, :, None, None] >> (4 * k + hi_shift[None, :, None, None] + p)) & 1) << 2)  # [BN, w, p, k]
    # An L1-resident gather (32 floats = one line). Not software-pipelined (num_stages=1): the pipeliner would
    # stage every gathered value through shared memory.
    return tl.load(table_ptr + tl.reshape(code, (BLOCK_N, N))).to(DTYPE)


@triton.jit
def _tile_words(cache_ptr, stride_cb, stride_cs, stride_ch, bt_row, h_kv, n, n_ok, BLOCK_SIZE: tl.constexpr,
                H: tl.constexpr, K_BITS0: tl.constexpr, K_WORD0: tl.constexpr, K_BITS1: tl.constexpr,
                K_WORD1: tl.constexpr, V_BITS0: tl.constexpr, V_WORD0: tl.constexpr, V_BITS1: tl.constexpr,
                V_WORD1: tl.constexpr, NORM_WORD: tl.constexpr, WIDE: tl.constexpr):
    """Every word of the KV tile at positions ``n`` (a slot read as aligned int32 words, layout: packing.py):
    the scales word, then (plane, high plane) of K's and V's two halves. Word offsets are 32-bit unless the cache
    has 2^31 words or more (WIDE): 64-bit products per row cost ~8% of the loop's instructions."""
    blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0)
    if WIDE:
        blk = blk.to(tl.int64)
    rows = cache_ptr + blk * stride_cb + (n % BLOCK_SIZE) * stride_cs + h_kv * stride_ch
    scales = tl.load(rows + NORM_WORD, mask=n_ok, other=0)
    k0, k0h = _half_words(rows, n_ok, K_WORD0, H, K_BITS0)
    k1, k1h = _half_words(rows, n_ok, K_WORD1, H, K_BITS1)
    v0, v0h = _half_words(rows, n_ok, V_WORD0, H, V_BITS0)
    v1, v1h = _half_words(rows, n_ok, V_WORD1, H, V_BITS1)
    return scales, k0, k0h, k1, k1h, v0, v0h, v1, v1h


@triton.jit
def _slot_scales(sc):
    """(K scale, V scale) as float32 from a slot's scales word: both bf16 share it (K low half, V high half), and
    a bf16 is the top half of an fp32."""
    return (sc << 16).to(tl.float32, bitcast=True), (sc & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    # Largest s with qsl[s] // BLOCK_Q + s <= pid: query blocks of sequence s start there.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Counts that change with every batch (sequences, tokens) are not specialized: Triton would otherwise compile a
# variant per value class (1, a multiple of 16, other) in the middle of serving, the first time a batch shows it.
@triton.jit(do_not_specialize=["num_seqs"])
def _attn_kernel(
    q_ptr, stride_qt, stride_qh,  # rotated queries [Tq, Hq, D]
    cache_ptr, stride_cb, stride_cs, stride_ch,  # the paged cache as int32 words
    bt_ptr, stride_bt, seq_lens_ptr, qsl_ptr, num_seqs, k_table, v_table,
    o_ptr, stride_os, stride_ot, stride_oh, lse_ptr, stride_ls, stride_lt,
    qk_scale,  # softmax scale * log2(e) / sqrt(D)
    # FUSED_FINISH only: per-(sequence, KV head) split counters, what _merge_unrotate needs, the final output
    lock_ptr, rot_ptr, stride_rh, vscale_ptr, vmean_ptr, stride_cal, fin_ptr, stride_ft, stride_fh,
    D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr,
    K_BITS0: tl.constexpr, K_WORD0: tl.constexpr, K_BITS1: tl.constexpr, K_WORD1: tl.constexpr,
    V_BITS0: tl.constexpr, V_WORD0: tl.constexpr, V_BITS1: tl.constexpr, V_WORD1: tl.constexpr,
    K_ASM0: tl.constexpr, K_ASM1: tl.constexpr, V_ASM0: tl.constexpr, V_ASM1: tl.constexpr,
    K_LUT_SCALE0: tl.constexpr, K_LUT_SCALE1: tl.constexpr, V_LUT_SCALE0: tl.constexpr, V_LUT_SCALE1: tl.constexpr,
    NORM_WORD: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr, WIDE: tl.constexpr,
    FUSED_FINISH: tl.constexpr, BLOCK_E: tl.constexpr, OUT_BF16: tl.constexpr, ROT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h_kv = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one query per sequence: program = sequence
        s = pid
        qb = 0
    else:
        s = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    if not DECODE:
        qb = pid - (q_start // BLOCK_Q + s)
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s)
    ctx = seq_len - q_len

    # Rows = BLOCK_Q query tokens x the G query heads of this KV head (padded to >= 16 rows for tl.dot).
    # Channels in two halves of H = D/2 (each packed with its own bits): two dots per product.
    H: tl.constexpr = D // 2
    r = tl.arange(0, BLOCK_M)
    qi = qb * BLOCK_Q + r // G_PAD
    g = r % G_PAD
    row_ok = (qi < q_len) & (g < G) & (r < BLOCK_Q * G_PAD)
    pos = ctx + qi  # absolute position of each row's query token
    c = tl.arange(0, H)
    q_rows = q_ptr + (q_start + qi).to(tl.int64) * stride_qt + (h_kv * G + g) * stride_qh
    q0 = tl.load(q_rows[:, None] + c[None, :], mask=row_ok[:, None], other=0.0)
    q1 = tl.load(q_rows[:, None] + H + c[None, :], mask=row_ok[:, None], other=0.0)
    if K_LUT_SCALE0 != 1.0:  # the register lookup yields v of K's codebooks s * v: s goes into the query once
        q0 = (q0.to(tl.float32) * K_LUT_SCALE0).to(q0.dtype)
    if K_LUT_SCALE1 != 1.0:
        q1 = (q1.to(tl.float32) * K_LUT_SCALE1).to(q1.dtype)

    kv_end = tl.minimum(seq_len, ctx + (qb + 1) * BLOCK_Q)
    # Split s takes KV tiles [s T / S, (s + 1) T / S) of the T = cdiv(kv_end, BLOCK_N), the floor or the ceiling of
    # T / S each. (Splits of cdiv(kv_end, S) tokens rounded up to whole tiles gave every split but the last the
    # ceiling: a sequence of 32,800 tokens got 15 splits of 17 tiles and one of 2 where 16 and 17 do.)
    tiles = tl.cdiv(kv_end, BLOCK_N)
    kv_lo = split * tiles // NUM_SPLITS * BLOCK_N
    kv_hi = tl.minimum(kv_end, (split + 1) * tiles // NUM_SPLITS * BLOCK_N)

    # Products are taken transposed, tokens x rows: the KV tile is the first operand, so M = BLOCK_N >= 64 and on
    # Hopper tl.dot runs as wgmma reading the dequantized tile from shared memory (a 16-row query block as the
    # first operand only gets mma.sync, whose register operands cost ~2 moves per instruction).
    q0 = tl.trans(q0)  # [H, BLOCK_M]
    q1 = tl.trans(q1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([H, BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([H, BLOCK_M], dtype=tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    v_unit = 1.0 / tl.sqrt(D * 1.0)
    # With PREFETCH the words of the tile at kv_lo are loaded up front, and each step loads the next tile's (its
    # loads in flight while this tile computes): all of them (2), or only the scales and K (1: V's words then load at
    # the top of the step, in flight during the K product, and 29 fewer registers stay live across steps); without
    # (0), each step loads its own tile.
    if PREFETCH > 0:
        n = kv_lo + tl.arange(0, BLOCK_N)
        sc, k0w, k0h, k1w, k1h, v0w, v0h, v1w, v1h = _tile_words(
            cache_ptr, stride_cb, stride_cs, stride_ch, bt_row, h_kv, n, n < kv_hi, BLOCK_SIZE, H,
            K_BITS0, K_WORD0, K_BITS1, K_WORD1, V_BITS0, V_WORD0, V_BITS1, V_WORD1, NORM_WORD, WIDE)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_hi
        t = n + (BLOCK_N if PREFETCH > 0 else 0)  # the tile whose words this step loads
        nsc, nk0w, nk0h, nk1w, nk1h, nv0w, nv0h, nv1w, nv1h = _tile_words(
            cache_ptr, stride_cb, stride_cs, stride_ch, bt_row, h_kv, t, t < kv_hi, BLOCK_SIZE, H,
            K_BITS0, K_WORD0, K_BITS1, K_WORD1, V_BITS0, V_WORD0, V_BITS1, V_WORD1, NORM_WORD, WIDE)
        if PREFETCH == 0:
            sc, k0w, k0h, k1w, k1h, v0w, v0h, v1w, v1h = nsc, nk0w, nk0h, nk1w, nk1h, nv0w, nv0h, nv1w, nv1h
        elif PREFETCH == 1:  # this tile's V words (the call's other loads are unused, so not emitted)
            _, _, _, _, _, v0w, v0h, v1w, v1h = _tile_words(
                cache_ptr, stride_cb, stride_cs, stride_ch, bt_row, h_kv, n, n_ok, BLOCK_SIZE, H,
                K_BITS0, K_WORD0, K_BITS1, K_WORD1, V_BITS0, V_WORD0, V_BITS1, V_WORD1, NORM_WORD, WIDE)
        s_k, s_v = _slot_scales(sc)
        s_v = s_v * v_unit
        k0 = _half_values(k0w, k0h, k_table, H, K_BITS0, BLOCK_N, K_ASM0, q0.dtype)
        k1 = _half_values(k1w, k1h, k_table + 16, H, K_BITS1, BLOCK_N, K_ASM1, q0.dtype)
        logits = tl.dot(k0, q0, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        logits = tl.dot(k1, q1, logits, input_precision=DOT_PRECISION) * (s_k * qk_scale)[:, None]
        if DECODE:  # the one query sees every key before kv_hi (= its sequence's length)
            ok = n_ok[:, None]
        else:
            ok = n_ok[:, None] & (n[:, None] <= pos[None, :])
        logits = tl.where(ok, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.exp2(logits - m_safe[None, :])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        pv = tl.where(ok, p * s_v[:, None], 0.0).to(q0.dtype)  # masked 0 * NaN value (quantizer.py) stays 0
        v0 = _half_values(v0w, v0h, v_table, H, V_BITS0, BLOCK_N, V_ASM0, q0.dtype)
        acc0 = tl.dot(tl.trans(v0), pv, acc0 * alpha[None, :], input_precision=DOT_PRECISION)  # [H, BLOCK_M]
        v1 = _half_values(v1w, v1h, v_table + 16, H, V_BITS1, BLOCK_N, V_ASM1, q0.dtype)
        acc1 = tl.dot(tl.trans(v1), pv, acc1 * alpha[None, :], input_precision=DOT_PRECISION)
        m_i = m_new
        if PREFETCH == 1:
            sc, k0w, k0h, k1w, k1h = nsc, nk0w, nk0h, nk1w, nk1h
        elif PREFETCH == 2:
            sc, k0w, k0h, k1w, k1h, v0w, v0h, v1w, v1h = nsc, nk0w, nk0h, nk1w, nk1h, nv0w, nv0h, nv1w, nv1h

    out_rows = (q_start + qi).to(tl.int64) * stride_ot + (h_kv * G + g) * stride_oh + split * stride_os
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_rows = o_ptr + out_rows[None, :] + c[:, None]  # [H, BLOCK_M], as the accumulators
    tl.store(o_rows, acc0 * (V_LUT_SCALE0 / l_safe)[None, :], mask=row_ok[None, :])  # (V's s, as K's above)
    tl.store(o_rows + H, acc1 * (V_LUT_SCALE1 / l_safe)[None, :], mask=row_ok[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))  # base-2 log-sum-exp
        lse_rows = (q_start + qi).to(tl.int64) * stride_lt + (h_kv * G + g) + split * stride_ls
        tl.store(lse_ptr + lse_rows, lse, mask=row_ok)
    if FUSED_FINISH:  # decode: the split of (sequence, KV head) that ends last merges them (no finish launch)
        tl.debug_barrier()  # every thread's partial output is stored before the program counts itself done
        lock = lock_ptr + s * tl.num_programs(1) + h_kv
        if tl.atomic_add(lock, 1, sem="acq_rel") == NUM_SPLITS - 1:  # release ours, acquire the others'
            tl.atomic_xchg(lock, 0)  # ready for the next launch (a CUDA-graph replay)
            t = (q_start + qi).to(tl.int64)
            _merge_unrotate(o_ptr, stride_os, t * stride_ot + (h_kv * G + g) * stride_oh, lse_ptr, stride_ls,
                            t * stride_lt + h_kv * G + g, row_ok, h_kv, rot_ptr, stride_rh, vscale_ptr, vmean_ptr,
                            stride_cal, fin_ptr, t * stride_ft + (h_kv * G + g) * stride_fh, D, BLOCK_M, BLOCK_E,
                            NUM_SPLITS, OUT_BF16, ROT_PRECISION, ".cg")


@triton.jit
def _token_rows(num_tokens, G: tl.constexpr, G_PAD: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr):
    """Rows of a query/finish program: TOKENS tokens x the G query heads of KV head program_id(1) (each token's
    heads padded to G_PAD rows). Returns (token, head in group, row valid)."""
    r = tl.arange(0, ROWS)
    t = tl.program_id(0).to(tl.int64) * TOKENS + r // G_PAD
    g = r % G_PAD
    return t, g, (g < G) & (r < TOKENS * G_PAD) & (t < num_tokens)


@triton.jit(do_not_specialize=["num_tokens"])
def _query_kernel(q_ptr, stride_qt, stride_qh, num_tokens, scale_ptr, stride_sh, rot_ptr, stride_rh, out_scale,
                  out_ptr, stride_ot, stride_oh, D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                  TOKENS: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
    """The G query heads of TOKENS tokens and one KV head, calibrated (x key_scale), rotated (x R^T) and scaled
    (x out_scale) in
    float32, stored in the dot dtype: one launch instead of torch's elementwise ops, matmul and casts."""
    h = tl.program_id(1)
    t, g, ok = _token_rows(num_tokens, G, G_PAD, TOKENS, ROWS)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + t[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh + d[None, :], mask=ok[:, None],
                other=0.0)
    q = q.to(tl.float32) * (tl.load(scale_ptr + h * stride_sh + d) * out_scale)[None, :]
    e = tl.arange(0, BLOCK_E)
    for e0 in tl.static_range(0, D, BLOCK_E):  # column blocks keep R's tile small for head_dim 256
        r = tl.load(rot_ptr + h * stride_rh + (e0 + e)[:, None] * D + d[None, :])  # R[e, :]
        y = tl.dot(q, tl.trans(r), input_precision=PRECISION)
        tl.store(out_ptr + t[:, None] * stride_ot + (h * G + g)[:, None] * stride_oh + (e0 + e)[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _merge_unrotate(part_ptr, stride_ps, part_off, lse_ptr, stride_ls, lse_off, ok, h, rot_ptr, stride_rh, vscale_ptr,
                    vmean_ptr, stride_ch, out_ptr, out_off, D: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_E: tl.constexpr, NUM_SPLITS: tl.constexpr, OUT_BF16: tl.constexpr,
                    PRECISION: tl.constexpr, CACHE: tl.constexpr):
    """ROWS query rows of KV head ``h`` (offsets ``part_off`` / ``lse_off`` / ``out_off`` into the partial outputs,
    their log-sum-exps and the output): merge the KV splits (weights 2^(lse_i - max)), un-rotate (x R) and apply
    the calibration's value scale and mean, in float32; stores in the output's dtype. CACHE: the partials' load
    cache modifier (".cg" where other programs of the same launch wrote them: not through this SM's L1)."""
    d = tl.arange(0, D)
    rows = part_ptr + part_off[:, None] + d[None, :]
    if NUM_SPLITS == 1:
        y = tl.load(rows, mask=ok[:, None], other=0.0, cache_modifier=CACHE).to(tl.float32)
    else:
        m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        w_sum = tl.zeros([ROWS], dtype=tl.float32)
        y = tl.zeros([ROWS, D], dtype=tl.float32)
        for sp in range(NUM_SPLITS):
            lse = tl.load(lse_ptr + sp * stride_ls + lse_off, mask=ok, other=float("-inf"), cache_modifier=CACHE)
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split with keys yet
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe)  # 0 for an empty split (lse = -inf)
            part = tl.load(rows + sp * stride_ps, mask=ok[:, None], other=0.0, cache_modifier=CACHE).to(tl.float32)
            y = y * alpha[:, None] + part * w[:, None]
            w_sum = w_sum * alpha + w
            m = m_new
        y = y / tl.where(w_sum > 0, w_sum, 1.0)[:, None]
    e = tl.arange(0, BLOCK_E)
    for e0 in tl.static_range(0, D, BLOCK_E):
        r = tl.load(rot_ptr + h * stride_rh + d[:, None] * D + (e0 + e)[None, :])  # R[:, e]
        o = tl.dot(y, r, input_precision=PRECISION)
        cal = h * stride_ch + e0 + e
        o = o * tl.load(vscale_ptr + cal)[None, :] + tl.load(vmean_ptr + cal)[None, :]
        if OUT_BF16:  # round to nearest even in integers (the CPU interpreter's .to(bfloat16) truncates)
            f = o.to(tl.int32, bitcast=True)
            o = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).to(tl.int16)
        tl.store(out_ptr + out_off[:, None] + (e0 + e)[None, :], o.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit(do_not_specialize=["num_tokens"])
def _finish_kernel(part_ptr, stride_ps, stride_pt, stride_ph, lse_ptr, stride_ls, stride_lt, num_tokens, rot_ptr,
                   stride_rh, vscale_ptr, vmean_ptr, stride_ch, out_ptr, stride_ot, stride_oh, D: tl.constexpr,
                   G: tl.constexpr, G_PAD: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_E: tl.constexpr, NUM_SPLITS: tl.constexpr, OUT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """``_merge_unrotate`` for the G query heads of TOKENS tokens and one KV head."""
    h = tl.program_id(1)
    t, g, ok = _token_rows(num_tokens, G, G_PAD, TOKENS, ROWS)
    _merge_unrotate(part_ptr, stride_ps, t * stride_pt + (h * G + g) * stride_ph, lse_ptr, stride_ls,
                    t * stride_lt + h * G + g, ok, h, rot_ptr, stride_rh, vscale_ptr, vmean_ptr, stride_ch, out_ptr,
                    t * stride_ot + (h * G + g) * stride_oh, D, ROWS, BLOCK_E, NUM_SPLITS, OUT_BF16, PRECISION, "")


def _num_splits(query: torch.Tensor, num_programs: int, max_context: int, tile: Tile) -> int:
    """Enough programs to fill the GPU, from shapes only (no sync, so CUDA-graph safe)."""
    if not query.is_cuda:
        return 1 if max_context <= 4 * tile.block_n else 2
    props = torch.cuda.get_device_properties(query.device)
    per_sm = None  # resident programs per SM: known only under a register cap
    if tile.maxnreg:
        per_sm = max(1, getattr(props, "regs_per_multiprocessor", 65536) // (tile.maxnreg * 32 * tile.num_warps))
    return split_count(num_programs, max_context, tile.block_n, props.multi_processor_count, per_sm)


def split_count(num_programs: int, max_context: int, block_n: int, sms: int, per_sm: int | None) -> int:
    """KV splits of a launch of ``num_programs`` (sequence or token-block, KV head) pairs on ``sms`` SMs: a power
    of two up to ~8 programs per SM and >= 4 KV tiles per split; with ``per_sm`` (programs resident per SM) known,
    the smallest of those whose waves keep the most program slots busy, else the largest.

    Measured (bench_tq_attention --sweep, H100): a program keeps few loads in flight, so splitting until ~8
    programs per SM beats 2 (bs32 @ 4K: 0.186 vs 0.203 ms). 2026-12-07 (experiments/attention_splits_probe-*),
    with 3 programs per SM (160 registers): a launch of 1.3 waves loses to one of fewer, longer splits in one
    wave (bs1 @ 32K: 32 splits 0.047 ms, 64 splits 0.059; bs1 @ 128K 0.134 vs 0.149; bs8 @ 4K 4 splits 0.041
    vs 8 0.043), and 2.6 waves beat 1.3 (bs8 @ 32K: 16 splits 0.226, 8 0.241; bs32 @ 4K: 4 splits 0.120, 2
    0.127). Tiles without a register cap (prefill, head_dim 256) keep the largest count: not measured by fill."""
    want = max(1, (8 * sms) // max(1, num_programs))
    cap = max(1, max_context // (4 * block_n))
    limit = min(64, triton.next_power_of_2(min(want, cap)))
    if per_sm is None:
        return limit
    slots = sms * per_sm

    def wave_fill(splits: int) -> float:  # busy fraction of the program slots over all waves
        programs = num_programs * splits
        return programs / (-(-programs // slots) * slots)

    candidates = [1 << i for i in range(limit.bit_length())]
    return max(candidates, key=lambda s: (round(wave_fill(s), 6), -s))


@dataclass(frozen=True)
class Tile:
    """Launch shape: KV tokens per loop step, warps, software-pipeline stages, and for multi-token queries the
    rows (query tokens x GQA heads) per program (chosen by bench_tq_attention --sweep)."""

    block_n: int
    num_warps: int
    num_stages: int
    block_m: int = 64
    prefetch: int = 0  # the next KV tile's words loaded while this one computes: 0 none, 1 scales + K, 2 all
    # Registers per thread (ptxas .maxnreg), None = the compiler's choice. The decode kernel takes 174 on sm_90:
    # 2 programs of 4 warps per SM; up to 168 fits 3 (65,536 / (168 x 128) = 3.05), 128 fits 4 (spills in the
    # loop). bench_tq_attention --sweep measures whether occupancy pays for the spills (default_tile).
    maxnreg: int | None = None


def default_tile(head_dim: int, decode: bool) -> Tile:
    # bench_tq_attention --sweep (H100, 2026-12-06, D=128): prefetch makes decode 1-5% faster and a 2048-token
    # prefill chunk 2% slower; software-pipeline stages 2-3 are 40-70% slower (the loads are not the bound:
    # decoding is); head_dim 256 not re-swept. 2026-12-07, capped at 160 registers (3 programs per SM instead of 2),
    # decode is 9-10% faster at batch 8-32, while a 2048-token prefill chunk is 63% slower, so only decode is capped;
    # 168 (the most that still fits 3 per SM) beside 160 in one H100 run: bs32 @ 4K 0.116 vs 0.119 ms, other points
    # within 1% (bench_tq_attention_20261207-185548 vs -185426/-185506).
    if head_dim > 128:
        return Tile(64, 8, 1)
    return Tile(128, 4, 1, prefetch=2, maxnreg=168) if decode else Tile(128, 4, 1)


def wide_offsets(words: torch.Tensor) -> bool:
    """The WIDE constexpr of ``_tile_words``: 64-bit word offsets only for a cache of 2^31 words or more."""
    return words.numel() >= 2**31


def _halves_args(prefix: str, codec: TensorCodec, lookup: bool) -> dict[str, object]:
    """Kernel constexprs of one tensor's two halves: bits, first slot word, and the register-lookup PTX (empty
    for the portable path)."""
    args: dict[str, object] = {}
    for i, (bits, word) in enumerate(codec.halves()):
        args |= {f"{prefix}_BITS{i}": bits, f"{prefix}_WORD{i}": word,
                 f"{prefix}_ASM{i}": _lut(bits, codec.head_dim)[0] if lookup else ""}
    return args


def _lut_scales(prefix: str, codec: TensorCodec, lookup: bool) -> dict[str, float]:
    """The scale ``s`` of each half's codebook ``s * v`` where the register lookup yields ``v`` (1: the portable
    path's float32 table holds ``s * v``)."""
    return {f"{prefix}_LUT_SCALE{i}": _lut(bits, codec.head_dim)[1] if lookup else 1.0
            for i, (bits, _) in enumerate(codec.halves())}


@functools.cache
def _lut(bits: int, head_dim: int) -> tuple[str, float]:
    """(register-lookup PTX, codebook scale s) of one half; cached: every attention call reads both (building the
    codebook tensors took ~15 us of Python per half)."""
    s, values = e4m3_codebook(head_dim, bits)
    return (lut.asm_4bit(values) if bits == 4 else lut.asm_planes(values)), s


# Queries enter the register-lookup kernel as fp16 scaled by 2^-8 (undone in the softmax scale): a bf16 query's
# coordinates may exceed fp16's 65504, not 2^24; small ones lose nothing a bf16 query would keep (fp16's subnormal
# step 2^-24 x 2^8 is below a bf16 rounding of coordinates above 2^-6).
LOOKUP_QUERY_SCALE = 2.0 ** -8


def uses_register_lookup(query: torch.Tensor) -> bool:
    """Whether attention on ``query`` runs the register codebook lookup (lut.py), with fp16 dots: 16-bit models on
    the GPU; fp32 models and the CPU interpreter gather from the float32 table instead."""
    return query.is_cuda and dot_dtype(query) != torch.float32


def dot_dtype(query: torch.Tensor) -> torch.dtype:
    """The rotated query's dtype where it meets model-dtype values (dense prefill's FlashAttention, the portable
    path): fp32 models keep fp32 dots; bf16/fp16 models their own dtype (the register-lookup kernel takes fp16
    instead: ``uses_register_lookup``). Triton's CPU interpreter has no bf16 arithmetic (numpy), so bf16 dots run
    in fp32 there."""
    native = (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else (torch.float16, torch.bfloat16)
    return query.dtype if query.dtype in native else torch.float32


@dataclass(frozen=True)
class _Rotation:
    """Launch arguments shared by the query and finish kernels."""

    g_pad: int
    tokens: int  # tokens per program
    rows: int
    block_e: int
    rot_stride: int
    cal_stride: int
    precision: str

    def grid(self, num_tokens: int, num_kv_heads: int) -> tuple[int, int]:
        return triton.cdiv(num_tokens, self.tokens), num_kv_heads


def _rotation(state: TurboQuantState, g: int, num_tokens: int, dtype: torch.dtype) -> _Rotation:
    cal = state.calibration
    g_pad = triton.next_power_of_2(g)
    # Each program loads the whole rotation (64 KiB at head_dim 128, from L2: the bulk of these kernels' time).
    # tl.dot takes >= 16 rows, so a decode batch's programs fill them with tokens rather than padding (G=4: 4 tokens
    # per program, a quarter of the R reads); a prefill chunk of thousands of tokens would re-read R per 16 rows
    # (bs8 x 2K-token prefill, H100: query + finish took longer than FlashAttention itself), so long chunks share
    # each R tile across 64 rows (32 at head_dim 256, whose float32 rows are twice as wide).
    target_rows = 16 if num_tokens < 1024 else 64 if state.head_dim <= 128 else 32
    tokens = max(1, target_rows // g_pad)
    # tf32 rotations where the result is rounded to 16 bits anyway (tf32's 2^-11 < bf16/fp16 rounding)
    return _Rotation(g_pad=g_pad, tokens=tokens, rows=max(16, tokens * g_pad),  # tl.dot needs >= 16 rows
                     block_e=min(64, state.head_dim),
                     rot_stride=0 if state.rot.shape[0] == 1 else state.rot.stride(0),  # per layer or KV head
                     cal_stride=0 if cal.key_scale.shape[0] == 1 else cal.key_scale.stride(0),
                     precision="ieee" if dtype == torch.float32 else "tf32")


def rotate_query(query: torch.Tensor, state: TurboQuantState, num_kv_heads: int, dtype: torch.dtype | None = None,
                 scale: float = 1.0) -> torch.Tensor:
    """Calibrated, rotated queries ``[Tq, Hq, D]`` (``naive.attention``'s ``q_rot``) times ``scale``, in ``dtype``
    (default: the dot dtype)."""
    tq, hq, d = query.shape
    dtype = dtype or dot_dtype(query)
    rot = _rotation(state, hq // num_kv_heads, tq, dtype)
    q_rot = torch.empty(tq, hq, d, dtype=dtype, device=query.device)
    _query_kernel[rot.grid(tq, num_kv_heads)](
        query, query.stride(0), query.stride(1), tq, state.calibration.key_scale, rot.cal_stride, state.rot,
        rot.rot_stride, scale, q_rot, q_rot.stride(0), q_rot.stride(1), D=d, G=hq // num_kv_heads, G_PAD=rot.g_pad,
        TOKENS=rot.tokens, ROWS=rot.rows, BLOCK_E=rot.block_e, PRECISION=rot.precision)
    return q_rot


def finish(part: torch.Tensor, lse: torch.Tensor, state: TurboQuantState, num_kv_heads: int,
           out: torch.Tensor) -> torch.Tensor:
    """``out`` from rotated partial outputs ``part [S, Tq, Hq, D]`` (any float dtype) of S KV splits with base-2
    log-sum-exps ``lse [S, Tq, Hq]`` (unread for S = 1): merge, un-rotate, undo the calibration."""
    _, tq, hq, _ = part.shape
    return _launch_finish(part, lse, state, num_kv_heads, out, _rotation(state, hq // num_kv_heads, tq, dot_dtype(out)))


def _launch_finish(part: torch.Tensor, lse: torch.Tensor, state: TurboQuantState, hkv: int, out: torch.Tensor,
                   rot: _Rotation) -> torch.Tensor:
    """``finish`` with the launch arguments ``attention`` already derived for its own launch."""
    splits, tq, hq, d = part.shape
    cal = state.calibration
    _finish_kernel[rot.grid(tq, hkv)](
        part, part.stride(0), part.stride(1), part.stride(2), lse, lse.stride(0), lse.stride(1), tq, state.rot,
        rot.rot_stride, cal.value_scale, cal.value_mean, rot.cal_stride, _out_words(out), out.stride(0), out.stride(1),
        D=d, G=hq // hkv, G_PAD=rot.g_pad, TOKENS=rot.tokens, ROWS=rot.rows, BLOCK_E=rot.block_e, NUM_SPLITS=splits,
        OUT_BF16=out.dtype == torch.bfloat16, PRECISION=rot.precision)
    return out


def _out_words(out: torch.Tensor) -> torch.Tensor:
    """bf16 outputs are written as int16 words (the kernels round to nearest even themselves)."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


# A decode launch with KV splits merges them in its own last program per (sequence, KV head) instead of a finish
# launch: each split program counts itself done in an int32 word, and the one that counts last merges. The words are
# zero between launches (the merging program resets its own), so a CUDA graph replays them as captured. Kept per
# device and stream (launches on two streams may overlap, e.g. vLLM's dual-batch overlap) and never freed: a captured
# graph holds their address. A capture may be the first launch on its stream (torch.cuda.graph captures on a stream
# of its own unless given one; vLLM passes its current stream): the words are then allocated and zeroed inside the
# capture (from the graph's pool; the zeroing replays with that graph, before its first attention launch), else the
# capture would get the finish kernel (it did in bench_tq_attention at 22:12 on 2026-12-07). VLLM_GDS_TQ_FUSED_FINISH=0
# launches the finish kernel instead. Measured beside it (H100, 2026-12-07, whole call, default preset): bs1 @ 32K
# 0.038 vs 0.047 ms, bs1 @ 128K 0.123 vs 0.130, bs8 @ 32K 0.211 vs 0.223, bs8 @ 128K 0.803 vs 0.819; but bs32 0.5-1.5%
# slower (256 merging programs at the end of the launch against one finish launch), so on a GPU only launches of at
# most one (sequence, KV head) pair per SM merge in place.
FUSED_FINISH_ENV = "VLLM_GDS_TQ_FUSED_FINISH"
# Counter words allocated at least (a GPU launch merges in place only for pairs <= SMs; the CPU for any count).
_MIN_LOCK_WORDS = 1024


def fuses_finish(query: torch.Tensor, pairs: int) -> bool:
    """Whether a decode launch with KV splits over ``pairs`` (sequence, KV head) pairs merges them in place."""
    if os.environ.get(FUSED_FINISH_ENV, "1") == "0":
        return False
    return not query.is_cuda or pairs <= torch.cuda.get_device_properties(query.device).multi_processor_count


_split_locks: dict[tuple[torch.device, int], list[torch.Tensor]] = {}


def split_locks(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` zeroed counter words on ``device`` for launches on its current stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    held = _split_locks.setdefault((device, stream), [])  # every one kept: graphs that captured it hold its address
    if not held or held[-1].numel() < count:
        held.append(torch.zeros(max(count, _MIN_LOCK_WORDS), dtype=torch.int32, device=device))
    return held[-1]


def attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
              query_start_loc: torch.Tensor, scale: float, state: TurboQuantState,
              out: torch.Tensor | None = None, num_splits: int | None = None, tile: Tile | None = None
              ) -> torch.Tensor:
    """Same contract as ``naive.attention``; ``num_splits`` and ``tile`` override the launch heuristics."""
    assert cache.dtype == torch.uint8 and cache.stride(3) == 1, "cache slots must be contiguous uint8 bytes"
    tq, hq, d = query.shape
    hkv = cache.shape[2]
    g = hq // hkv
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(query)
    assert query.stride(2) == 1 and out.stride(2) == 1, "head_dim must be contiguous"
    words = cache.view(torch.int32)  # slots are whole words (quantizer.TurboQuantState.build)
    lookup = uses_register_lookup(query)
    q_scale = LOOKUP_QUERY_SCALE if lookup else 1.0
    q_rot = rotate_query(query, state, hkv, torch.float16 if lookup else None, q_scale)
    g_pad = triton.next_power_of_2(g)
    decode = tq == num_seqs  # every sequence has >= 1 query, so this means one query each
    tile = tile or default_tile(d, decode)
    block_q = 1 if decode else max(1, tile.block_m // g_pad)
    grid0 = num_seqs if decode else tq // block_q + num_seqs
    max_context = block_table.shape[1] * cache.shape[1]
    splits = num_splits or _num_splits(query, grid0 * hkv, max_context, tile)
    o_rot = torch.empty(splits, tq, hq, d, dtype=torch.float32, device=query.device)
    lse = torch.empty(splits, tq, hq, dtype=torch.float32, device=query.device)
    locks = None
    if decode and splits > 1 and fuses_finish(query, num_seqs * hkv):
        locks = split_locks(query.device, num_seqs * hkv)
    rot = _rotation(state, g, tq, dot_dtype(out))
    cal = state.calibration
    _attn_kernel[(grid0, hkv, splits)](
        q_rot, q_rot.stride(0), q_rot.stride(1),
        words, words.stride(0), words.stride(1), words.stride(2),
        block_table, block_table.stride(0), seq_lens, query_start_loc, num_seqs,
        state.key.group_table, state.value.group_table,
        o_rot, o_rot.stride(0), o_rot.stride(1), o_rot.stride(2), lse, lse.stride(0), lse.stride(1),
        scale * math.log2(math.e) / math.sqrt(d) / q_scale,
        lse if locks is None else locks, state.rot, rot.rot_stride, cal.value_scale, cal.value_mean, rot.cal_stride,
        _out_words(out), out.stride(0), out.stride(1),
        D=d, G=g, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_M=max(16, block_q * g_pad), BLOCK_N=tile.block_n,
        BLOCK_SIZE=cache.shape[1], NUM_SPLITS=splits, DECODE=decode, **_halves_args("K", state.key, lookup),
        **_halves_args("V", state.value, lookup), **_lut_scales("K", state.key, lookup),
        **_lut_scales("V", state.value, lookup), NORM_WORD=state.key.norm_offset // 4,
        DOT_PRECISION="ieee" if q_rot.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        PREFETCH=tile.prefetch, WIDE=wide_offsets(words), FUSED_FINISH=locks is not None, BLOCK_E=rot.block_e,
        OUT_BF16=out.dtype == torch.bfloat16, ROT_PRECISION=rot.precision,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **({"maxnreg": tile.maxnreg} if tile.maxnreg else {}),
    )
    return out if locks is not None else _launch_finish(o_rot, lse, state, hkv, out, rot)
