"""Plain-torch reference for the TurboQuant paged-cache kernels (also the CPU execution path).

Same signatures as the Triton versions in this folder. Readable over fast: per-sequence loops, full fp32 math.
Attention rotates with the fast Walsh-Hadamard transform (independent of the dense matrices the Triton path
uses); the store rotates with the same dense float32 rotation as the Triton store path (the kernel's part, codes
and scale, is what must be bit-exact; _encode says why).
"""

from __future__ import annotations

import torch

from vllm_gds_plugin.kvcache import rotation
from vllm_gds_plugin.kvcache.packing import pack_codes, unpack_codes
from vllm_gds_plugin.kvcache.quantizer import TensorCodec, TurboQuantState, pow2_scale


def _encode(x: torch.Tensor, codec: TensorCodec, state: TurboQuantState, slot: torch.Tensor) -> None:
    """Quantize prepared (calibrated) float32 vectors ``[T, Hkv, D]`` into their bytes of ``slot [T, Hkv, S]``."""
    # Rotated at max |x| in [1, 2) (an exact power of two, undone on the scale): no product of the rotation is
    # subnormal (flushed to zero by some float32 matmuls, not by others) and no sum overflows, so every finite
    # vector is quantized as at ordinary magnitude. The kernel path's dense float32 rotation, not the fast
    # transform: for a vector dominated by one huge element (1e38 next to 1.0 in bf16) the butterflies leave that
    # element's rounding noise where the dense product gives its exact zero weight plus the small elements, and
    # codes at the 0 threshold follow that sign. (FWHT == dense: test_tq_core.)
    p, unscale = pow2_scale(x.abs().amax(-1, keepdim=True))
    codes, scale = codec.quantize(state.rotate(x * p), unscale.squeeze(-1))
    bits = scale.to(torch.bfloat16).view(torch.int16)
    bits = torch.where(scale.isnan(), torch.full_like(bits, 0x7FC0), bits)  # one canonical NaN, as the kernel
    slot[..., codec.code_offset:codec.code_offset + codec.code_bytes] = pack_codes(codes, codec.split)
    slot[..., codec.norm_offset:codec.norm_offset + 2] = bits.unsqueeze(-1).view(torch.uint8)


def store(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
          state: TurboQuantState) -> None:
    """Quantize ``key/value [T, Hkv, D]`` into ``cache [blocks, block_size, Hkv, slot]`` at ``slot_mapping``."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    data = torch.empty(*key[valid].shape[:2], state.slot_bytes, dtype=torch.uint8, device=cache.device)
    _encode(state.prepare_key(key[valid]), state.key, state, data)
    _encode(state.prepare_value(value[valid]), state.value, state, data)
    block_size = cache.shape[1]
    cache[slots // block_size, slots % block_size] = data


def _decode(rows: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    packed = rows[..., codec.code_offset:codec.code_offset + codec.code_bytes]
    scale = rows[..., codec.norm_offset:codec.norm_offset + 2].contiguous().view(torch.bfloat16).squeeze(-1)
    return codec.dequantize(unpack_codes(packed, codec.split, codec.head_dim), scale)


def read_rotated(cache: torch.Tensor, block_row: torch.Tensor, length: int,
                 state: TurboQuantState) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized rotated K and V ``[length, Hkv, D]`` (float32, prepared = calibrated units) of one sequence's
    first ``length`` tokens."""
    block_size = cache.shape[1]
    nblocks = -(-length // block_size)
    rows = cache[block_row[:nblocks].long()].reshape(nblocks * block_size, *cache.shape[2:])[:length]
    return _decode(rows, state.key), _decode(rows, state.value)


def read_for_attention(cache: torch.Tensor, block_row: torch.Tensor, length: int,
                       state: TurboQuantState) -> tuple[torch.Tensor, torch.Tensor]:
    """``read_rotated`` in the form a dense attention kernel gets it (reference of ``triton_dequant``): a token
    whose value is NaN has a NaN key and a zero value instead, so that it reaches only the queries that see it."""
    k, v = read_rotated(cache, block_row, length, state)
    bad = v.isnan().any(-1, keepdim=True)
    return k.masked_fill(bad, float("nan")), v.masked_fill(bad, 0.0)


def _signs_for_heads(state: TurboQuantState, num_heads: int) -> torch.Tensor:
    return state.signs.repeat_interleave(num_heads // state.signs.shape[0], dim=0)


def attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
              query_start_loc: torch.Tensor, scale: float, state: TurboQuantState,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``query [Tq, Hq, D]`` over the compressed cache; each sequence's queries are its
    last ``query_start_loc[s+1] - query_start_loc[s]`` positions."""
    if out is None:
        out = torch.empty_like(query)
    hq, hkv = query.shape[1], cache.shape[2]
    signs_q = _signs_for_heads(state, hq)
    q_rot = rotation.rotate(state.prepare_query(query), signs_q)
    starts = query_start_loc.tolist()
    for s, length in enumerate(seq_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        k, v = read_rotated(cache, block_table[s], length, state)
        k = k.repeat_interleave(hq // hkv, dim=1)  # [L, Hq, D]
        v = v.repeat_interleave(hq // hkv, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q_rot[q0:q1], k) * scale
        q_pos = torch.arange(length - (q1 - q0), length, device=query.device)
        causal = torch.arange(length, device=query.device)[None, :] <= q_pos[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        # A NaN value (stored for non-finite input, quantizer.py) reaches exactly the queries that see its token:
        # 0 * NaN must not leak it into the earlier queries of a multi-token chunk.
        bad = v.isnan().any(-1)  # [L, Hq]
        o_rot = torch.einsum("hqk,khd->qhd", probs, v.masked_fill(bad[..., None], 0.0))
        sees_bad = (causal[None] & bad.T[:, None, :]).any(-1)  # [Hq, q]
        o_rot = o_rot.masked_fill(sees_bad.T[..., None], float("nan"))
        out[q0:q1] = state.finish_output(rotation.unrotate(o_rot, signs_q)).to(out.dtype)
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, scale: float, causal: bool, out: torch.Tensor,
                     want_lse: bool) -> torch.Tensor | None:
    """Reference for the FlashAttention varlen call ``dense_prefill`` makes (``dense_prefill.VarlenAttention``):
    causal masks align each sequence's queries with the end of its keys."""
    hq, hkv = q.shape[1], k.shape[1]
    lse = torch.empty(hq, q.shape[0], dtype=torch.float32, device=q.device)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for s in range(len(bq) - 1):
        qs = q[bq[s]:bq[s + 1]].float()
        ks = k[bk[s]:bk[s + 1]].float().repeat_interleave(hq // hkv, dim=1)
        vs = v[bk[s]:bk[s + 1]].float().repeat_interleave(hq // hkv, dim=1)
        logits = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            nq, nk = qs.shape[0], ks.shape[0]
            seen = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + nk - nq
            logits = logits.masked_fill(~seen, float("-inf"))
        lse[:, bq[s]:bq[s + 1]] = torch.logsumexp(logits, dim=-1)
        out[bq[s]:bq[s + 1]] = torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), vs).to(out.dtype)
    return lse if want_lse else None
