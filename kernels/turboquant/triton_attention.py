"""Triton attention over the TurboQuant paged cache: decode and multi-token queries, split-KV + reduction.

One program = (query block of one sequence, KV head, KV split). Its rows are BLOCK_Q query tokens x the G query
heads of that KV head, so every K/V tile is read and dequantized ONCE for the whole GQA group, into registers
only, then fed to ``tl.dot`` (tensor cores). Everything is in the rotated domain: q is rotated once up front,
P·V accumulates rotated values and the output is un-rotated once at the end (two small torch matmuls, with the
calibration's query scale and value mean/scale applied elementwise around them), so the
kernels never touch a rotation and never write a dequantized cache. The scale of each K/V vector is pulled out
of the dot products (logits *= s_k; P *= s_v), so the tiles fed to tl.dot are bare codebook values. Slots are
read as aligned int32 words only (layout: kvcache/packing.py). A pure decode batch runs one program per
(sequence, KV head, split), so no program is launched empty.
Grids depend only on tensor shapes (CUDA-graph safe, no host syncs). Reference: ``naive.attention``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_gds_plugin.kvcache.quantizer import TensorCodec, TurboQuantState


@triton.jit
def _plane(rows, n_ok, WORD: tl.constexpr, N: tl.constexpr, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fields [BLOCK_N, N] of one bit plane (N channels of WIDTH bits from slot word WORD). packing.py puts channel
    i of a plane of nw words in word i % nw at bit (i // nw) * WIDTH, so each distinct word is loaded once and
    fanned out in registers: shifting words [BN, 1, nw] by field offsets [1, F, 1] gives [BN, F, nw], which in
    row-major order IS channel order f * nw + w."""
    w = tl.load(rows[:, None] + WORD + tl.arange(0, N * WIDTH // 32)[None, :], mask=n_ok[:, None], other=0)
    f = (w[:, None, :] >> (tl.arange(0, 32 // WIDTH) * WIDTH)[None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(f, (BLOCK_N, N))


@triton.jit
def _half_values(rows, n_ok, table_ptr, WORD: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Codebook values [BLOCK_N, N] (unit-variance units) of one half of K or V (N channels at BITS bits, planes
    from slot word WORD: 4 -> one 4-bit plane, 3 -> 2-bit low + 1-bit high plane, 2 -> one 2-bit plane)."""
    if BITS == 4:
        code = _plane(rows, n_ok, WORD, N, 4, BLOCK_N)
    else:
        code = _plane(rows, n_ok, WORD, N, 2, BLOCK_N)
        if BITS == 3:
            code = code | (_plane(rows, n_ok, WORD + N // 16, N, 1, BLOCK_N) << 2)
    # An L1-resident gather (32 floats = one line). Measured on H100: 2x faster than a compare/select chain in
    # registers. Not software-pipelined (num_stages=1): the pipeliner would stage every gathered value through
    # shared memory.
    return tl.load(table_ptr + code)


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
    cache_ptr, stride_cb, stride_cs, stride_ch,  # the paged cache as int32 words
    bt_ptr, stride_bt, seq_lens_ptr, qsl_ptr, num_seqs, k_table, v_table,
    o_ptr, stride_os, stride_ot, stride_oh, lse_ptr, stride_ls, stride_lt,
    qk_scale,  # softmax scale * log2(e) / sqrt(D)
    D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr,
    K_BITS0: tl.constexpr, K_WORD0: tl.constexpr, K_BITS1: tl.constexpr, K_WORD1: tl.constexpr,
    V_BITS0: tl.constexpr, V_WORD0: tl.constexpr, V_BITS1: tl.constexpr, V_WORD1: tl.constexpr,
    NORM_WORD: tl.constexpr, DOT_PRECISION: tl.constexpr,
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

    kv_end = tl.minimum(seq_len, ctx + (qb + 1) * BLOCK_Q)
    chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = split * chunk
    kv_hi = tl.minimum(kv_end, kv_lo + chunk)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, H], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, H], dtype=tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    v_unit = 1.0 / tl.sqrt(D * 1.0)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_hi
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        rows = cache_ptr + blk * stride_cb + (n % BLOCK_SIZE) * stride_cs + h_kv * stride_ch
        # Both bf16 scales share one word (K low half, V high half); a bf16 is the top half of an fp32.
        scales = tl.load(rows + NORM_WORD, mask=n_ok, other=0)
        s_k = (scales << 16).to(tl.float32, bitcast=True)
        s_v = (scales & -65536).to(tl.float32, bitcast=True) * v_unit
        k0 = _half_values(rows, n_ok, k_table, K_WORD0, H, K_BITS0, BLOCK_N).to(q0.dtype)
        k1 = _half_values(rows, n_ok, k_table + 16, K_WORD1, H, K_BITS1, BLOCK_N).to(q0.dtype)
        logits = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
        logits = tl.dot(q1, tl.trans(k1), logits, input_precision=DOT_PRECISION) * (s_k * qk_scale)[None, :]
        ok = n_ok[None, :] & (n[None, :] <= pos[:, None])
        logits = tl.where(ok, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.exp2(logits - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = (p * s_v[None, :]).to(q0.dtype)
        v0 = _half_values(rows, n_ok, v_table, V_WORD0, H, V_BITS0, BLOCK_N).to(q0.dtype)
        acc0 = tl.dot(pv, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        v1 = _half_values(rows, n_ok, v_table + 16, V_WORD1, H, V_BITS1, BLOCK_N).to(q0.dtype)
        acc1 = tl.dot(pv, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out_rows = (q_start + qi).to(tl.int64) * stride_ot + (h_kv * G + g) * stride_oh + split * stride_os
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_rows = o_ptr + out_rows[:, None] + c[None, :]
    tl.store(o_rows, acc0 / l_safe[:, None], mask=row_ok[:, None])
    tl.store(o_rows + H, acc1 / l_safe[:, None], mask=row_ok[:, None])
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
    """Enough programs to fill the GPU, from shapes only (no sync, so CUDA-graph safe)."""
    if not query.is_cuda:
        return 1 if max_context <= 4 * block_n else 2
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    want = max(1, (2 * sms) // max(1, num_programs))
    cap = max(1, max_context // (4 * block_n))
    return min(64, triton.next_power_of_2(min(want, cap)))


@dataclass(frozen=True)
class Tile:
    """Launch shape: KV tokens per loop step, warps, software-pipeline stages (chosen by bench_tq_attention)."""

    block_n: int
    num_warps: int
    num_stages: int


def default_tile(head_dim: int) -> Tile:
    return Tile(128, 4, 1) if head_dim <= 128 else Tile(64, 8, 1)  # measured: bench_tq_attention --sweep


def _halves_args(prefix: str, codec: TensorCodec) -> dict[str, int]:
    (b0, w0), (b1, w1) = codec.halves()
    return {f"{prefix}_BITS0": b0, f"{prefix}_WORD0": w0, f"{prefix}_BITS1": b1, f"{prefix}_WORD1": w1}


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
    words = cache.view(torch.int32)  # slots are whole words (quantizer.TurboQuantState.build)
    # fp32 models keep fp32 dots; bf16/fp16 models feed their own dtype to the tensor cores.
    # Triton's CPU interpreter has no bf16 arithmetic (numpy), so bf16 dots run in fp32 there.
    native = (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else (torch.float16, torch.bfloat16)
    dot_dtype = query.dtype if query.dtype in native else torch.float32
    q_rot = state.rotate_query(state.prepare_query(query)).to(dot_dtype).contiguous()
    g_pad = triton.next_power_of_2(g)
    decode = tq == num_seqs  # every sequence has >= 1 query, so this means one query each
    block_q = 1 if decode else max(1, 64 // g_pad)
    tile = tile or default_tile(d)
    grid0 = num_seqs if decode else tq // block_q + num_seqs
    max_context = block_table.shape[1] * cache.shape[1]
    splits = num_splits or _num_splits(query, grid0 * hkv, max_context, tile.block_n)
    o_rot = torch.empty(splits, tq, hq, d, dtype=torch.float32, device=query.device)
    lse = torch.empty(splits, tq, hq, dtype=torch.float32, device=query.device)
    _attn_kernel[(grid0, hkv, splits)](
        q_rot, q_rot.stride(0), q_rot.stride(1),
        words, words.stride(0), words.stride(1), words.stride(2),
        block_table, block_table.stride(0), seq_lens, query_start_loc, num_seqs,
        state.key.group_table, state.value.group_table,
        o_rot, o_rot.stride(0), o_rot.stride(1), o_rot.stride(2), lse, lse.stride(0), lse.stride(1),
        scale * math.log2(math.e) / math.sqrt(d),
        D=d, G=g, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_M=max(16, block_q * g_pad), BLOCK_N=tile.block_n,
        BLOCK_SIZE=cache.shape[1], NUM_SPLITS=splits, DECODE=decode, **_halves_args("K", state.key),
        **_halves_args("V", state.value), NORM_WORD=state.key.norm_offset // 4,
        DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    if splits > 1:
        merged = torch.empty(tq, hq, d, dtype=torch.float32, device=query.device)
        _reduce_kernel[(tq * hq,)](o_rot, o_rot.stride(0), lse, lse.stride(0), merged, D=d, NUM_SPLITS=splits,
                                   SPLITS_PAD=triton.next_power_of_2(splits))
    else:
        merged = o_rot[0]
    out.copy_(state.finish_output(state.unrotate(merged)))
    return out
