"""Triton quantize-and-store: scatter rotated, quantized, bit-packed K/V into the paged uint8 cache.

The calibration transform and the rotation are elementwise ops and one dense matmul in torch
(``state.prepare_key/prepare_value``, ``state.rotate``); the kernel computes the least-squares scale,
the codes and the packed bytes per (token tile, KV head) and writes them at ``slot_mapping`` (-1 = skip). Packing
reads ``pack_desc`` (which channel/bits land in which byte), so the layout is defined once, in packing.py.
Reference: ``naive.store``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_gds_plugin.kvcache.quantizer import MAX_LEVELS, TensorCodec, TurboQuantState


@triton.jit
def _quantize_store_kernel(
    y_ptr, stride_yt, stride_yh,  # rotated float32 [T, H, D]
    slot_ptr, cache_ptr, stride_cb, stride_cs, stride_ch, block_size,
    cent_ptr, bnd_ptr, pack_ptr, code_off, norm_off, T,
    D: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr, BLOCK_T: tl.constexpr, NLEV: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    slot = tl.load(slot_ptr + t, mask=tmask, other=-1).to(tl.int64)
    valid = slot >= 0
    d = tl.arange(0, D)
    row = y_ptr + t.to(tl.int64) * stride_yt + h * stride_yh
    y = tl.load(row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
    norm = tl.sqrt(tl.sum(y * y, axis=1))
    ok = (norm > 0) & (norm < float("inf"))  # zero and non-finite vectors get the codes of u = 0
    inv = tl.where(ok, tl.sqrt(D * 1.0) / norm, 0.0)
    u = tl.where(ok[:, None], y * inv[:, None], 0.0)
    code = tl.zeros([BLOCK_T, D], dtype=tl.int32)
    for i in tl.static_range(NLEV - 1):
        code += (u > tl.load(bnd_ptr + d * (NLEV - 1) + i)[None, :]).to(tl.int32)
    c_hat = tl.load(cent_ptr + d[None, :] * NLEV + code)
    scale = tl.sqrt(D * 1.0) * tl.sum(y * c_hat, axis=1) / tl.sum(c_hat * c_hat, axis=1)
    scale = tl.where(norm > 0, scale, 0.0)  # +0 for a zero vector, as torch (the GPU sum of -0s gives -0)
    scale = tl.where(norm < float("inf"), scale, float("nan"))  # False for +inf and NaN

    nb = tl.arange(0, NB_PAD)
    nbmask = nb < NB
    packed = tl.zeros([BLOCK_T, NB_PAD], dtype=tl.int32)
    for k in tl.static_range(8):  # up to 8 fields per byte (1-bit planes)
        ch = tl.load(pack_ptr + nb * 8 + k, mask=nbmask, other=0)
        cshift = tl.load(pack_ptr + NB * 8 + nb * 8 + k, mask=nbmask, other=0)
        fmask = tl.load(pack_ptr + 2 * NB * 8 + nb * 8 + k, mask=nbmask, other=0)
        bshift = tl.load(pack_ptr + 3 * NB * 8 + nb * 8 + k, mask=nbmask, other=0)
        yk = tl.load(row[:, None] + ch[None, :], mask=tmask[:, None], other=0.0)
        uk = tl.where(ok[:, None], yk * inv[:, None], 0.0)
        ck = tl.zeros([BLOCK_T, NB_PAD], dtype=tl.int32)
        for i in tl.static_range(NLEV - 1):
            ck += (uk > tl.load(bnd_ptr + ch * (NLEV - 1) + i)[None, :]).to(tl.int32)
        packed |= ((ck >> cshift[None, :]) & fmask[None, :]) << bshift[None, :]

    blk = slot // block_size
    base = cache_ptr + blk * stride_cb + (slot % block_size) * stride_cs + h * stride_ch
    tl.store(base[:, None] + code_off + nb[None, :], packed.to(tl.uint8), mask=valid[:, None] & nbmask[None, :])
    # fp32 -> bf16 with round-to-nearest-even done in integers: bit-identical to torch on every backend
    # (Triton's interpreter truncates in .to(tl.bfloat16)).
    f = scale.to(tl.int32, bitcast=True)
    bits = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16) & 0xFFFF
    tl.store(base + norm_off, (bits & 255).to(tl.uint8), mask=valid)
    tl.store(base + norm_off + 1, ((bits >> 8) & 255).to(tl.uint8), mask=valid)


def _store_one(y: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, codec: TensorCodec) -> None:
    t, h, d = y.shape
    block_t = 16
    grid = (triton.cdiv(t, block_t), h)
    _quantize_store_kernel[grid](
        y, y.stride(0), y.stride(1), slot_mapping, cache, cache.stride(0), cache.stride(1), cache.stride(2),
        cache.shape[1], codec.centroids, codec.boundaries, codec.pack_desc, codec.code_offset, codec.norm_offset,
        t, D=d, NB=codec.code_bytes, NB_PAD=triton.next_power_of_2(codec.code_bytes), BLOCK_T=block_t,
        NLEV=MAX_LEVELS,
    )


def store(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
          state: TurboQuantState) -> None:
    """Same contract as ``naive.store``."""
    assert cache.dtype == torch.uint8 and cache.stride(3) == 1, "cache slots must be contiguous uint8 bytes"
    if key.shape[0] == 0:
        return
    _store_one(state.rotate(state.prepare_key(key)).contiguous(), cache, slot_mapping, state.key)
    _store_one(state.rotate(state.prepare_value(value)).contiguous(), cache, slot_mapping, state.value)
