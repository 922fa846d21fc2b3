"""Bit packing of quantization codes with no wasted bits.

A b-bit code is split into bit planes of width 4, 2 or 1 (4 -> [4], 3 -> [2, 1], 2 -> [2], 1 -> [1]); each plane
of ``n`` channels packs into ``n * w / 8`` bytes, element ``i`` at byte ``i * w // 8``, bit ``(i * w) % 8``. So 8
3-bit values take 3 bytes (2 bytes of low 2-bit fields + 1 byte of high bits) and every field is extracted with
one byte load, one shift and one mask, which is what the Triton kernels do; they read the same plane list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_gds_plugin.kvcache.presets import ChannelSplit

PLANE_WIDTHS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}


@dataclass(frozen=True)
class Plane:
    first_channel: int
    channels: int
    width: int  # bits per field in this plane
    code_shift: int  # where the field sits in the code (low plane 0, high plane = width of the low one)
    byte_offset: int  # inside the tensor's packed code bytes

    @property
    def nbytes(self) -> int:
        return self.channels * self.width // 8


def planes(split: ChannelSplit, head_dim: int) -> list[Plane]:
    out: list[Plane] = []
    offset = 0
    for first, n, bits in split.groups(head_dim):
        shift = 0
        for w in PLANE_WIDTHS[bits]:
            out.append(Plane(first, n, w, shift, offset))
            offset += n * w // 8
            shift += w
    return out


def pack_codes(codes: torch.Tensor, split: ChannelSplit) -> torch.Tensor:
    """``codes [..., D]`` (integers < 2**bits per channel) -> ``uint8 [..., code_bytes]``."""
    d = codes.shape[-1]
    codes = codes.to(torch.int32)
    chunks = []
    for p in planes(split, d):
        per_byte = 8 // p.width
        field = (codes[..., p.first_channel:p.first_channel + p.channels] >> p.code_shift) & ((1 << p.width) - 1)
        field = field.reshape(*codes.shape[:-1], p.nbytes, per_byte)
        shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * p.width
        chunks.append((field << shifts).sum(-1).to(torch.uint8))
    return torch.cat(chunks, dim=-1)


def unpack_codes(packed: torch.Tensor, split: ChannelSplit, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., code_bytes]`` -> ``int64 [..., D]``."""
    lead = packed.shape[:-1]
    codes = torch.zeros(*lead, head_dim, dtype=torch.int64, device=packed.device)
    for p in planes(split, head_dim):
        per_byte = 8 // p.width
        raw = packed[..., p.byte_offset:p.byte_offset + p.nbytes].to(torch.int64).unsqueeze(-1)
        shifts = torch.arange(per_byte, device=packed.device) * p.width
        field = ((raw >> shifts) & ((1 << p.width) - 1)).reshape(*lead, p.channels)
        codes[..., p.first_channel:p.first_channel + p.channels] |= field << p.code_shift
    return codes
