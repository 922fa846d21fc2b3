"""Triton dequantization of paged-cache ranges into a dense K/V workspace (for the FlashAttention prefill path).

One program = (tile, KV head). A tile is up to BLOCK_N consecutive positions of one sequence, written to
consecutive workspace rows: ``tiles [n, 4]`` int32 rows ``(sequence, first position, first workspace row, count)``.
K and V come out rotated and in calibrated units, ``centroid * scale / sqrt(D)`` rounded once to the workspace
dtype, i.e. what ``naive.read_rotated`` returns, so attention over them with rotated queries is attention over
the compressed cache. One exception keeps a NaN where the compressed-cache attention puts it: a token whose value
is NaN (non-finite input, quantizer.py) is written as a NaN key and a zero value. A dense kernel multiplies the
zero probability of a causally masked token by its value, and 0 * NaN would reach the chunk's earlier queries;
a NaN key instead reaches exactly the queries that see the token (masking replaces the logit). Slot words are
read by the attention kernel's own ``_tile_words`` / ``_half_values``. Reference: ``naive.read_for_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_gds_plugin.kernels.turboquant.triton_attention import (
    _half_values, _halves_args, _slot_scales, _tile_words, wide_offsets,
)
from vllm_gds_plugin.kvcache.quantizer import TurboQuantState

TILE_TOKENS = 64  # positions per tile (BLOCK_N)


@triton.jit
def _dequant_kernel(cache_ptr, stride_cb, stride_cs, stride_ch, bt_ptr, stride_bt, tiles_ptr, k_table, v_table,
                    k_ptr, v_ptr, stride_wt, stride_wh, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, K_BITS0: tl.constexpr, K_WORD0: tl.constexpr,
                    K_BITS1: tl.constexpr, K_WORD1: tl.constexpr, V_BITS0: tl.constexpr, V_WORD0: tl.constexpr,
                    V_BITS1: tl.constexpr, V_WORD1: tl.constexpr, K_ASM0: tl.constexpr, K_ASM1: tl.constexpr,
                    V_ASM0: tl.constexpr, V_ASM1: tl.constexpr, NORM_WORD: tl.constexpr, WIDE: tl.constexpr):
    tile = tiles_ptr + tl.program_id(0) * 4
    h_kv = tl.program_id(1)
    seq = tl.load(tile)
    first = tl.load(tile + 1)
    row0 = tl.load(tile + 2)
    count = tl.load(tile + 3)
    H: tl.constexpr = D // 2
    i = tl.arange(0, BLOCK_N)
    ok = i < count
    sc, k0w, k0h, k1w, k1h, v0w, v0h, v1w, v1h = _tile_words(
        cache_ptr, stride_cb, stride_cs, stride_ch, bt_ptr + seq.to(tl.int64) * stride_bt, h_kv, first + i, ok,
        BLOCK_SIZE, H, K_BITS0, K_WORD0, K_BITS1, K_WORD1, V_BITS0, V_WORD0, V_BITS1, V_WORD1, NORM_WORD, WIDE)
    inv_sqrt_d = 1.0 / tl.sqrt(D * 1.0)
    s_k, s_v = _slot_scales(sc)
    s_k = (s_k * inv_sqrt_d)[:, None]
    s_v = (s_v * inv_sqrt_d)[:, None]
    c = tl.arange(0, H)
    rows = (row0 + i).to(tl.int64)[:, None] * stride_wt + h_kv * stride_wh + c[None, :]
    dtype = k_ptr.dtype.element_ty
    # Centroids as exact float32 (table gather, no ASM): one rounding, of the product, to the workspace dtype.
    v_nan = s_v != s_v
    k0 = _half_values(k0w, k0h, k_table, H, K_BITS0, BLOCK_N, K_ASM0, tl.float32)
    tl.store(k_ptr + rows, tl.where(v_nan, float("nan"), k0 * s_k).to(dtype), mask=ok[:, None])
    k1 = _half_values(k1w, k1h, k_table + 16, H, K_BITS1, BLOCK_N, K_ASM1, tl.float32)
    tl.store(k_ptr + rows + H, tl.where(v_nan, float("nan"), k1 * s_k).to(dtype), mask=ok[:, None])
    v0 = _half_values(v0w, v0h, v_table, H, V_BITS0, BLOCK_N, V_ASM0, tl.float32)
    tl.store(v_ptr + rows, tl.where(v_nan, 0.0, v0 * s_v).to(dtype), mask=ok[:, None])
    v1 = _half_values(v1w, v1h, v_table + 16, H, V_BITS1, BLOCK_N, V_ASM1, tl.float32)
    tl.store(v_ptr + rows + H, tl.where(v_nan, 0.0, v1 * s_v).to(dtype), mask=ok[:, None])


def dequantize(cache: torch.Tensor, block_table: torch.Tensor, tiles: torch.Tensor, state: TurboQuantState,
               k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """Write the positions named by ``tiles`` (see module doc; count <= TILE_TOKENS) of ``cache [blocks,
    block_size, Hkv, slot]`` into ``k_out / v_out [rows, Hkv, D]``."""
    assert cache.dtype == torch.uint8 and cache.stride(3) == 1, "cache slots must be contiguous uint8 bytes"
    assert k_out.stride() == v_out.stride() and k_out.stride(2) == 1
    if tiles.shape[0] == 0:
        return
    words = cache.view(torch.int32)
    _dequant_kernel[(tiles.shape[0], cache.shape[2])](
        words, words.stride(0), words.stride(1), words.stride(2), block_table, block_table.stride(0), tiles,
        state.key.group_table, state.value.group_table, k_out, v_out, k_out.stride(0), k_out.stride(1),
        D=state.head_dim, BLOCK_N=TILE_TOKENS, BLOCK_SIZE=cache.shape[1], **_halves_args("K", state.key, False),
        **_halves_args("V", state.value, False), NORM_WORD=state.key.norm_offset // 4, WIDE=wide_offsets(words),
        num_warps=4)
