"""TurboQuant quantizer: per-layer state (rotation, codebooks, layout tables) and the torch reference math.

Everything happens in the rotated domain: a vector ``x`` is stored as codes ``c`` and one bf16 scale ``s`` with
``R x' ≈ s * centroid[c] / sqrt(D)``, where ``x' = (x - mean) / channel_scale`` uses the optional per-(KV head,
channel) calibration (calibration.py; identity without one). The calibration changes no stored byte and is exact
for attention: a key mean only adds ``q·mean`` to every logit of a query, which softmax ignores, and the channel
scale is moved onto the query (``q·k = (q*s)·(k/s)``); for values, ``sum_i p_i v_i = s * sum_i p_i v'_i + mean``
because the ``p_i`` sum to one, so mean and scale are applied once to the attention output. The scale is the least-squares optimum ``s = sqrt(D) <Rx, ĉ> / <ĉ, ĉ>``
rather than ``||x||``: same bytes, never worse, and it removes the shrinkage bias Lloyd-Max codebooks put on
inner products (measured in docs/turboquant.md). Kernels consume the codebook tables and the
per-half (bits, first word) built here; the packing layout itself is defined once, in packing.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_gds_plugin.kvcache import rotation
from vllm_gds_plugin.kvcache.calibration import LayerCalibration
from vllm_gds_plugin.kvcache.codebooks import CENTROIDS, E4M3_SCALES
from vllm_gds_plugin.kvcache.packing import planes
from vllm_gds_plugin.kvcache.presets import NORM_BYTES, ChannelSplit, TurboQuantPreset, check_head_dim

MAX_LEVELS = 16  # 4 bits
# Largest stored scale: a finite vector whose scale rounds above it saturates here instead of becoming Inf
# (bf16 0x7F7F, exact in float32; vLLM's fp8 KV cache saturates the same way).
BF16_MAX = torch.finfo(torch.bfloat16).max


def pow2_scale(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact powers of two ``(p, 1/p)`` with ``m * p`` in [1, 2) for max-abs values ``m >= 0`` (float32), taken
    from the exponent bits and clamped to normal floats (zero, subnormal, Inf and NaN get a clamped value). Scaling
    a vector by ``p`` is exact, so it changes no code or scale bit of an ordinary vector, but keeps ``y*y`` from
    overflowing (|y| ~ 1e30) or underflowing (~1e-30) in the norm. The store kernel computes the same bits."""
    e = ((m.view(torch.int32) >> 23) & 0xFF).clamp(1, 253)
    return ((254 - e) << 23).view(torch.float32), (e << 23).view(torch.float32)


def e4m3_codebook(head_dim: int, bits: int) -> tuple[float, torch.Tensor]:
    """``(s, v)``: the cache's codebook is ``s * v``, ``v`` (float64, ascending) the Lloyd-Max centroids / s
    rounded to fp8 e4m3 (gen_codebooks.py; at most +1.2% MSE), so that the GPU attention kernel can hold ``v`` as
    fp8 bytes in registers and multiply ``s`` in once (kernels/turboquant/lut.py)."""
    s = E4M3_SCALES[head_dim][bits]
    c = torch.tensor(CENTROIDS[head_dim][bits], dtype=torch.float64) / s
    return s, c.to(torch.float8_e4m3fn).to(torch.float64)


@dataclass
class TensorCodec:
    """How one of K or V is quantized and where it sits in the slot."""

    split: ChannelSplit
    head_dim: int
    code_offset: int  # byte offset of the packed codes inside the slot (a multiple of 4)
    code_bytes: int
    norm_offset: int  # byte offset of the bf16 scale inside the slot
    centroids: torch.Tensor  # float32 [D, 16]: centroid table per channel (unit-variance units), zero padded
    boundaries: torch.Tensor  # float32 [D, 15]: decision thresholds per channel, +inf padded
    group_table: torch.Tensor  # float32 [32]: centroids of channel half g at [16 g, 16 g + 16): one cache line

    @classmethod
    def build(cls, split: ChannelSplit, head_dim: int, code_offset: int, norm_offset: int,
              device: torch.device) -> "TensorCodec":
        d = head_dim
        cent = torch.zeros(d, MAX_LEVELS, dtype=torch.float64)
        bnd = torch.full((d, MAX_LEVELS - 1), float("inf"), dtype=torch.float64)
        table = torch.zeros(2 * MAX_LEVELS, dtype=torch.float64)
        for g, (first, n, bits) in enumerate(split.groups(d)):
            s, v = e4m3_codebook(d, bits)
            c = s * v
            cent[first:first + n, :c.numel()] = c
            bnd[first:first + n, :c.numel() - 1] = 0.5 * (c[1:] + c[:-1])
            table[g * MAX_LEVELS:g * MAX_LEVELS + c.numel()] = c
        return cls(split, d, code_offset, split.code_bytes(d), norm_offset, cent.float().to(device),
                   bnd.float().to(device), table.float().to(device))

    def halves(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bits, slot word of its first plane) of each half of the channels: what the attention kernel needs
        to find every field (packing.py: planes of a half follow each other, low plane first)."""
        first = {p.first_channel: p for p in reversed(planes(self.split, self.head_dim))}
        return tuple((bits, (self.code_offset + first[f].byte_offset) // 4)  # type: ignore[return-value]
                     for f, _, bits in self.split.groups(self.head_dim))

    # ---- torch reference -------------------------------------------------------------------------------------
    def quantize(self, y: torch.Tensor, unscale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated vectors ``y [..., D]`` -> (codes int64 [..., D], scale float32 [...]); ``unscale [...]``: exact
        powers of two the vectors were scaled by before the rotation (``encode``), undone on the scale. Same
        operations, in the same order, as the store kernel (triton_store.py); docs/turboquant.md "Edge values"
        for the contract."""
        d = self.head_dim
        sqrt_d = torch.tensor(float(d), device=y.device).sqrt()
        p, inv_p = pow2_scale(y.float().abs().amax(-1, keepdim=True))
        y = y.float() * p  # exact: max |y| in [1, 2) for every finite nonzero vector
        norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        ok = torch.isfinite(norm) & (norm > 0)  # zero and non-finite vectors get the codes of u = 0
        u = torch.where(ok, y * (sqrt_d / norm), torch.zeros_like(y))
        codes = (u.unsqueeze(-1) > self.boundaries).sum(-1)
        c_hat = self.lookup(codes)
        scale = sqrt_d * (y * c_hat).sum(-1) / (c_hat * c_hat).sum(-1) * inv_p.squeeze(-1)
        if unscale is not None:
            scale = scale * unscale
        norm = norm.squeeze(-1)
        # Finite: saturate (only a vector whose norm is past the bf16 range gets there); zero vector: +0.
        scale = torch.where(norm > 0, scale.clamp(-BF16_MAX, BF16_MAX), torch.zeros_like(scale))
        # Non-finite input has no meaningful code: poison the scale so attention over it yields NaN, as a bf16
        # cache holding that vector would, instead of silently returning finite garbage.
        scale = torch.where(torch.isfinite(norm), scale, torch.full_like(scale, float("nan")))
        return codes, scale

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Centroids (unit-variance units) for codes ``[..., D]``."""
        cent = self.centroids.expand(*codes.shape, MAX_LEVELS)
        return torch.gather(cent, -1, codes.unsqueeze(-1)).squeeze(-1)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.lookup(codes) * (scale.float().unsqueeze(-1) * self.head_dim ** -0.5)


@dataclass
class TurboQuantState:
    """Per-layer device tensors. Reproducible: the same (preset, head_dim, layer_index, seed) gives the same bits."""

    preset: TurboQuantPreset
    head_dim: int
    layer_index: int
    seed: int
    signs: torch.Tensor  # float32 [Hr, ROUNDS, D], Hr = 1 (per-layer rotation) or num_kv_heads
    rot: torch.Tensor  # float32 [Hr, D, D]: rotate(x) = x @ rot[h].T
    key: TensorCodec
    value: TensorCodec
    calibration: LayerCalibration  # float32 [Hc, D] tensors, Hc = 1 (identity) or num_kv_heads

    @classmethod
    def build(cls, preset: TurboQuantPreset, head_dim: int, layer_index: int, seed: int = 0,
              device: torch.device | str = "cpu", num_kv_heads: int = 1,
              calibration: LayerCalibration | None = None) -> "TurboQuantState":
        """``calibration``: this layer's statistics for this rank's ``num_kv_heads`` KV heads (None: identity)."""
        check_head_dim(head_dim)
        device = torch.device(device)
        heads = num_kv_heads if preset.per_head_rotation else 1
        signs = rotation.random_signs(seed, layer_index, heads, head_dim)
        rot = rotation.rotation_matrix(signs)
        # Slot: [K codes | V codes | K scale | V scale]. Code blocks are whole 32-bit words and the two bf16 scales
        # share one word, so kernels read a slot with aligned word loads only.
        kb, vb = preset.key.code_bytes(head_dim), preset.value.code_bytes(head_dim)
        key = TensorCodec.build(preset.key, head_dim, 0, kb + vb, device)
        value = TensorCodec.build(preset.value, head_dim, kb, kb + vb + NORM_BYTES, device)
        cal = LayerCalibration.identity(head_dim) if calibration is None else calibration
        cal.check(num_kv_heads, head_dim, f"layer {layer_index}")
        return cls(preset, head_dim, layer_index, seed, signs.to(device), rot.to(device), key, value,
                   cal.to(device))

    @property
    def slot_bytes(self) -> int:
        return self.value.norm_offset + NORM_BYTES

    # ---- calibration transforms (elementwise, shared by the reference and the Triton path) ----------------------
    def _per_head(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """Calibration rows ``[Hc, D]`` for ``heads`` heads (query heads are grouped onto KV heads)."""
        return t.repeat_interleave(heads // t.shape[0], dim=0)

    def prepare_key(self, k: torch.Tensor) -> torch.Tensor:
        """``k [T, Hkv, D]`` -> the float32 vectors that get rotated and quantized."""
        c = self.calibration
        return (k.float() - c.key_mean) / c.key_scale

    def prepare_value(self, v: torch.Tensor) -> torch.Tensor:
        c = self.calibration
        return (v.float() - c.value_mean) / c.value_scale

    def prepare_query(self, q: torch.Tensor) -> torch.Tensor:
        """``q [T, Hq, D]`` -> float32 queries whose dot with prepared keys gives the original logits (+ const)."""
        return q.float() * self._per_head(self.calibration.key_scale, q.shape[1])

    def finish_output(self, o: torch.Tensor) -> torch.Tensor:
        """Un-rotated attention output over prepared values ``[T, Hq, D]`` -> output over the original values."""
        c = self.calibration
        return o * self._per_head(c.value_scale, o.shape[1]) + self._per_head(c.value_mean, o.shape[1])

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H, D]`` -> rotated float32 (dense matmul; heads map to rotations when per-head)."""
        return torch.einsum("thd,hed->the", x.float(), self.rot.expand(x.shape[1], -1, -1))

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotate` for ``y [T, H, D]``; H may be query heads (grouped onto KV heads)."""
        h_kv = self.rot.shape[0]
        t, h, d = y.shape
        g = y.float().view(t, h_kv, h // h_kv, d)
        return torch.einsum("tkgd,kde->tkge", g, self.rot).reshape(t, h, d)

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        h_kv = self.rot.shape[0]
        t, h, d = q.shape
        g = q.float().view(t, h_kv, h // h_kv, d)
        return torch.einsum("tkgd,ked->tkge", g, self.rot).reshape(t, h, d)
