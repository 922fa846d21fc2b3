"""Seeded randomized Hadamard rotation (per layer or per KV head), reproducible across processes and devices.

``rotate(x) = H D2 H D1 x`` with ``H`` the orthonormal Walsh-Hadamard matrix and ``D1, D2`` random ±1 diagonals.
One round (``H D1``) already spreads a vector's energy, but a vector dominated by a few channels (the outlier key
channels of Qwen-like models) comes out with only a handful of distinct magnitudes, far from the Gaussian-like
coordinate distribution the Lloyd-Max codebooks assume. The second round sums ``d`` independent random-sign
terms per coordinate, so even a one-hot input ends up approximately Gaussian. Both rounds fold into one dense
orthogonal ``D x D`` matrix for the kernels (a matmul costs the same for one round or two).
"""

from __future__ import annotations

import torch

ROUNDS = 2


def _mix_seed(seed: int, layer_index: int, head: int) -> int:
    # Distinct, stable streams per (seed, layer, head); stays within the 64-bit seed range.
    return (seed * 1_000_003 + layer_index * 7_919 + head * 104_729 + 0x5EED) % (1 << 63)


def random_signs(seed: int, layer_index: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """±1 float32 signs, shape [num_heads, ROUNDS, head_dim]; CPU generator, so identical on every device."""
    out = torch.empty(num_heads, ROUNDS, head_dim)
    for h in range(num_heads):
        g = torch.Generator().manual_seed(_mix_seed(seed, layer_index, h))
        out[h] = torch.randint(0, 2, (ROUNDS, head_dim), generator=g).float() * 2 - 1
    return out


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (a power of two)."""
    d = x.shape[-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(x.shape) * d ** -0.5).to(x.dtype)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Apply the rotation to ``x [..., H, D]`` with ``signs [H or 1, ROUNDS, D]`` (fast transform, reference)."""
    for r in range(signs.shape[1]):
        x = fwht(x * signs[:, r])
    return x


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate` (H is symmetric and orthonormal, so each round inverts as D H)."""
    for r in reversed(range(signs.shape[1])):
        y = fwht(y) * signs[:, r]
    return y


def rotation_matrix(signs: torch.Tensor) -> torch.Tensor:
    """Dense float32 matrices ``R [H, D, D]`` with ``rotate(x) == x @ R[h].T`` per head."""
    h, _, d = signs.shape
    eye = torch.eye(d).expand(h, d, d).transpose(0, 1)  # [D(rows = basis vectors), H, D]
    return rotate(eye, signs).transpose(0, 1).transpose(1, 2).contiguous()
