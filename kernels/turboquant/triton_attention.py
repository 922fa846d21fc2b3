"""Triton attention over the TurboQuant paged cache: decode and multi-token queries, split-KV + reduction.

One program = (query block of one sequence, KV head, KV split). Its rows are BLOCK_Q query tokens x the G query
heads of that KV head, so every K/V tile is read and dequantized ONCE for the whole GQA group, into registers
only, then fed to ``tl.dot`` (tensor cores). Everything is in the rotated domain: q is rotated once up front,
P·V accumulates rotated values and the output is un-rotated once at the end (two small torch matmuls, with the
calibration's query scale and value mean/scale applied elementwise around them), so the
kernels never touch a rotation and never write a dequantized cache. The scale of each K/V vector is pulled out
of the dot products (logits *= s_k; P *= s_v), so the tiles fed to tl.dot are bare codebook values.
Grids depend only on tensor shapes (CUDA-graph safe, no host syncs). Reference: ``naive.attention``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vllm_gds_plugin.kvcache.quantizer import MAX_LEVELS, TensorCodec, TurboQuantState


@triton.jit
def _load_scale(rows, norm_off, mask):
    lo = tl.load(rows + norm_off, mask=mask, other=0).to(tl.int32)
    hi = tl.load(rows + norm_off + 1, mask=mask, other=0).to(tl.int32)
    # A bf16 is the top half of an fp32: widen in integers (exact, and no bf16 arithmetic needed).
    val = ((lo | (hi << 8)) << 16).to(tl.float32, bitcast=True)
    return tl.where(mask, val, 0.0)  # masked tokens get 0, never NaN from stale bytes


@triton.jit
def _dequant_codes(rows, mask, code_off, desc_ptr, cent_ptr, D: tl.constexpr, NLEV: tl.constexpr):
    """Centroid values [BLOCK_N, D] (unit-variance units) of the tokens at byte pointers ``rows``."""
    d = tl.arange(0, D)
    b0 = tl.load(desc_ptr + d)
    s0 = tl.load(desc_ptr + D + d)
    m0 = tl.load(desc_ptr + 2 * D + d)
    b1 = tl.load(desc_ptr + 3 * D + d)
    s1 = tl.load(desc_ptr + 4 * D + d)
    m1 = tl.load(desc_ptr + 5 * D + d)
    l1 = tl.load(desc_ptr + 6 * D + d)
    ptr = rows[:, None] + code_off
    lo = tl.load(ptr + b0[None, :], mask=mask[:, None], other=0).to(tl.int32)
    hi = tl.load(ptr + b1[None, :], mask=mask[:, None] & (m1[None, :] != 0), other=0).to(tl.int32)
    code = ((lo >> s0[None, :]) & m0[None, :]) | (((hi >> s1[None, :]) & m1[None, :]) << l1[None, :])
    return tl.load(cent_ptr + d[None, :] * NLEV + code)


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


@triton.jit
def _attn_kernel(
    q_ptr, stride_qt, stride_qh,  # rotated queries [Tq, Hq, D]
    cache_ptr, stride_cb, stride_cs, stride_ch, block_size,
    bt_ptr, stride_bt, seq_lens_ptr, qsl_ptr, num_seqs,
    k_desc, k_cent, k_code_off, k_norm_off, v_desc, v_cent, v_code_off, v_norm_off,
    o_ptr, stride_os, stride_ot, stride_oh, lse_ptr, stride_ls, stride_lt,
    qk_scale,  # softmax scale * log2(e) / sqrt(D)
    D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, NLEV: tl.constexpr,
):
    pid = tl.program_id(0)
    h_kv = tl.program_id(1)
    split = tl.program_id(2)
    s = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    qb = pid - (q_start // BLOCK_Q + s)
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s)
    ctx = seq_len - q_len

    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    r = tl.arange(0, BLOCK_M)
    qi = qb * BLOCK_Q + r // G_PAD
    g = r % G_PAD
    row_ok = (qi < q_len) & (g < G)
    pos = ctx + qi  # absolute position of each row's query token
    d = tl.arange(0, D)
    q_rows = q_ptr + (q_start + qi).to(tl.int64) * stride_qt + (h_kv * G + g) * stride_qh
    q = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

    kv_end = tl.minimum(seq_len, ctx + (qb + 1) * BLOCK_Q)
    chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = split * chunk
    kv_hi = tl.minimum(kv_end, kv_lo + chunk)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_hi
        blk = tl.load(bt_row + n // block_size, mask=n_ok, other=0).to(tl.int64)
        rows = cache_ptr + blk * stride_cb + (n % block_size) * stride_cs + h_kv * stride_ch
        k = _dequant_codes(rows, n_ok, k_code_off, k_desc, k_cent, D, NLEV).to(q.dtype)
        s_k = _load_scale(rows, k_norm_off, n_ok)
        logits = tl.dot(q, tl.trans(k)) * (s_k * qk_scale)[None, :]
        ok = n_ok[None, :] & (n[None, :] <= pos[:, None])
        logits = tl.where(ok, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.exp2(logits - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _dequant_codes(rows, n_ok, v_code_off, v_desc, v_cent, D, NLEV).to(q.dtype)
        s_v = _load_scale(rows, v_norm_off, n_ok) * (1.0 / tl.sqrt(D * 1.0))
        acc = acc * alpha[:, None] + tl.dot((p * s_v[None, :]).to(q.dtype), v)
        m_i = m_new

    out_rows = (q_start + qi).to(tl.int64) * stride_ot + (h_kv * G + g) * stride_oh + split * stride_os
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o_ptr + out_rows[:, None] + d[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))  # base-2 log-sum-exp
        lse_rows = (q_start + qi).to(tl.int64) * stride_lt + (h_kv * G + g) + split * stride_ls
        tl.store(lse_ptr + lse_rows, lse, mask=row_ok)


@triton.jit
def _reduce_kernel(part_ptr, stride_ps, lse_ptr, stride_ls, out_ptr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   SPLITS_PAD: tl.constexpr):
    """Merge the splits of one (token, head) row: weights 2^(lse_i - max)."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLITS_PAD)
    lse = tl.load(lse_ptr + sp * stride_ls + row, mask=sp < NUM_SPLITS, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - mx))
    d = tl.arange(0, D)
    parts = tl.load(part_ptr + sp[:, None] * stride_ps + row * D + d[None, :], mask=(sp < NUM_SPLITS)[:, None],
                    other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + d, out)


def _num_splits(query: torch.Tensor, num_programs: int, max_context: int, block_n: int) -> int:
    """Enough programs to fill the GPU, from shapes only (no sync)."""
    if not query.is_cuda:
        return 1 if max_context <= 4 * block_n else 2
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    want = max(1, (2 * sms) // max(1, num_programs))
    cap = max(1, max_context // (4 * block_n))
    return min(64, triton.next_power_of_2(min(want, cap)))


def _codec_args(codec: TensorCodec) -> tuple:
    return codec.unpack_desc, codec.centroids, codec.code_offset, codec.norm_offset


def attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
              query_start_loc: torch.Tensor, scale: float, state: TurboQuantState,
              out: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Same contract as ``naive.attention``; ``num_splits`` overrides the split-KV heuristic."""
    assert cache.dtype == torch.uint8 and cache.stride(3) == 1, "cache slots must be contiguous uint8 bytes"
    tq, hq, d = query.shape
    hkv = cache.shape[2]
    g = hq // hkv
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(query)
    # fp32 models keep fp32 dots; bf16/fp16 models feed their own dtype to the tensor cores.
    # Triton's CPU interpreter has no bf16 arithmetic (numpy), so bf16 dots run in fp32 there.
    native = (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else (torch.float16, torch.bfloat16)
    dot_dtype = query.dtype if query.dtype in native else torch.float32
    q_rot = state.rotate_query(state.prepare_query(query)).to(dot_dtype).contiguous()
    g_pad = triton.next_power_of_2(g)
    decode_like = tq <= num_seqs  # every sequence has >= 1 query, so this means one query each
    block_q = max(1, 16 // g_pad) if decode_like else max(1, 64 // g_pad)
    block_n = 64 if d <= 128 else 32
    grid0 = tq if block_q == 1 else tq // block_q + num_seqs
    max_context = block_table.shape[1] * cache.shape[1]
    splits = num_splits or _num_splits(query, grid0 * hkv, max_context, block_n)
    o_rot = torch.empty(splits, tq, hq, d, dtype=torch.float32, device=query.device)
    lse = torch.empty(splits, tq, hq, dtype=torch.float32, device=query.device)
    _attn_kernel[(grid0, hkv, splits)](
        q_rot, q_rot.stride(0), q_rot.stride(1),
        cache, cache.stride(0), cache.stride(1), cache.stride(2), cache.shape[1],
        block_table, block_table.stride(0), seq_lens, query_start_loc, num_seqs,
        *_codec_args(state.key), *_codec_args(state.value),
        o_rot, o_rot.stride(0), o_rot.stride(1), o_rot.stride(2), lse, lse.stride(0), lse.stride(1),
        scale * math.log2(math.e) / math.sqrt(d),
        D=d, G=g, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_N=block_n, NUM_SPLITS=splits, NLEV=MAX_LEVELS,
        num_warps=4 if d <= 128 else 8,
    )
    if splits > 1:
        merged = torch.empty(tq, hq, d, dtype=torch.float32, device=query.device)
        _reduce_kernel[(tq * hq,)](o_rot, o_rot.stride(0), lse, lse.stride(0), merged, D=d, NUM_SPLITS=splits,
                             SPLITS_PAD=triton.next_power_of_2(splits))
    else:
        merged = o_rot[0]
    out.copy_(state.finish_output(state.unrotate(merged)))
    return out
