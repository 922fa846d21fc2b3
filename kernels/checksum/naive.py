"""Plain-torch definition of the shard tensor checksum (the reference for the Triton kernel, and the CPU path).

A tensor's bytes, zero-padded to whole 4 KiB blocks, are read as little-endian int64 words ``w[b, j]`` (block
``b``, word ``j < 512``). Each block's sum ``S[b] = sum_j w[b, j] * M[j]`` uses fixed odd 64-bit multipliers, so
moving or swapping words inside a block changes it; the checksum is the pair ``A = sum_b S[b]`` and
``B = sum_b (b + 1) * S[b]``, all modulo 2**64, so moving, dropping or swapping whole blocks changes it too.
Written as 32 lowercase hex digits (A then B, unsigned).

Why not the file's xxh3-128: a hash of a whole file must run in file order on one core (12-20 GB/s on the GPU
machine's host, below the loader's speed), while this sum splits into independent blocks that a GPU checks
over the parameters themselves in a few milliseconds. It is an error-detecting code, not a cryptographic hash:
any change confined to one 64-bit word is caught, and random corruption goes unnoticed with a probability
about 2**-64 per sum. It never replaces the per-file xxh3-128 in the manifest (``vllm-gds verify`` checks both).
"""

from __future__ import annotations

import torch

BLOCK_BYTES = 4096
WORDS_PER_BLOCK = BLOCK_BYTES // 8
_STEP_WORDS = 1 << 20  # words per multiply-and-sum step: 8 MiB int64 scratch, ~22 GB/s on the 2-core box
_MASK64 = (1 << 64) - 1


def _splitmix64(seed: int, n: int) -> list[int]:
    out, x = [], seed
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append(z ^ (z >> 31))
    return out


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


# M[j]: odd (so every word's low bit reaches the sum), as int64 two's complement.
MULTIPLIERS: tuple[int, ...] = tuple(_signed(m | 1) for m in _splitmix64(0x76_6C_6C_6D_67_64_73, WORDS_PER_BLOCK))


def multipliers(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(MULTIPLIERS, dtype=torch.int64, device=device)


def block_sums(raw: torch.Tensor) -> torch.Tensor:
    """``S`` (int64, one per 4 KiB block) of a 1-D uint8 tensor on any device."""
    n = raw.numel()
    full = n - n % BLOCK_BYTES
    mult = multipliers(raw.device)
    sums = torch.empty(-(-n // BLOCK_BYTES), dtype=torch.int64, device=raw.device)
    if full:
        body = raw[:full]
        if body.data_ptr() % 8 or body.storage_offset() % 8:  # an int64 view needs 8-byte aligned memory
            body = body.clone()
        words = body.view(torch.int64).view(-1, WORDS_PER_BLOCK)
        step_rows = _STEP_WORDS // WORDS_PER_BLOCK
        scratch = torch.empty(min(words.shape[0], step_rows), WORDS_PER_BLOCK, dtype=torch.int64, device=raw.device)
        for r in range(0, words.shape[0], step_rows):
            rows = words[r:r + step_rows]
            prod = scratch[:rows.shape[0]]
            torch.mul(rows, mult, out=prod)
            torch.sum(prod, dim=1, out=sums[r:r + rows.shape[0]])
    if full < n:
        last = torch.zeros(BLOCK_BYTES, dtype=torch.uint8, device=raw.device)
        last[:n - full] = raw[full:]
        sums[-1] = (last.view(torch.int64) * mult).sum()
    return sums


def combine(a: int, b: int) -> str:
    """The hex form of the pair (A, B), given as Python ints of any sign."""
    return f"{a & _MASK64:016x}{b & _MASK64:016x}"


def checksum_of_sums(sums: torch.Tensor) -> str:
    index = torch.arange(1, sums.numel() + 1, dtype=torch.int64, device=sums.device)
    return combine(int(sums.sum()), int((sums * index).sum()))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (a view when it is contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def checksum(t: torch.Tensor) -> str:
    """The checksum of ``t``'s bytes (any dtype, shape and device)."""
    return checksum_of_sums(block_sums(as_bytes(t)))
