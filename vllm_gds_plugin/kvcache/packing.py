"""Bit packing of quantization codes with no wasted bits, laid out for 32-bit word loads.

A b-bit code is split into bit planes of width 4, 2 or 1 (4 -> [4], 3 -> [2, 1], 2 -> [2], 1 -> [1]). A plane of
``n`` channels fills ``nw = n * w / 32`` little-endian 32-bit words, and channel ``i`` sits in word ``i % nw`` at
bit ``(i // nw) * w``: strided rather than consecutive, so that a kernel finds any channel's field with one word
load, one shift and one mask, where the word index and shift are a modulo and a division of the channel index (no
per-byte tables, no byte gathers). So 8 3-bit values still take 3 bytes (2 bytes of low 2-bit fields + 1 byte of
high bits), and every plane (hence every tensor's code block) is a whole number of words. Kernels read the
per-channel (word, shift, mask) table built from :func:`planes` in quantizer.py, so the layout is defined here only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_gds_plugin.kvcache.presets import ChannelSplit

PLANE_WIDTHS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}
WORD_BITS = 32


@dataclass(frozen=True)
class Plane:
    first_channel: int
    channels: int
    width: int  # bits per field in this plane
    code_shift: int  # where the field sits in the code (low plane 0, high plane = width of the low one)
    byte_offset: int  # inside the tensor's packed code bytes (a multiple of 4)

    @property
    def words(self) -> int:
        return self.channels * self.width // WORD_BITS

    @property
    def nbytes(self) -> int:
        return 4 * self.words

    def word_and_bit(self, i: int) -> tuple[int, int]:
        """Word index (inside the plane) and bit position of the plane's ``i``-th channel."""
        return i % self.words, (i // self.words) * self.width


def planes(split: ChannelSplit, head_dim: int) -> list[Plane]:
    out: list[Plane] = []
    offset = 0
    for first, n, bits in split.groups(head_dim):
        shift = 0
        for w in PLANE_WIDTHS[bits]:
            if n * w % WORD_BITS:
                raise ValueError(f"a {bits}-bit group of {n} channels does not fill whole 32-bit words")
            out.append(Plane(first, n, w, shift, offset))
            offset += n * w // 8
            shift += w
    return out


def pack_codes(codes: torch.Tensor, split: ChannelSplit) -> torch.Tensor:
    """``codes [..., D]`` (integers < 2**bits per channel) -> ``uint8 [..., code_bytes]``."""
    d = codes.shape[-1]
    lead = codes.shape[:-1]
    chunks = []
    for p in planes(split, d):
        field = (codes[..., p.first_channel:p.first_channel + p.channels].long() >> p.code_shift) & ((1 << p.width) - 1)
        field = field.reshape(*lead, WORD_BITS // p.width, p.words)  # [..., field slot, word]
        shifts = (torch.arange(WORD_BITS // p.width, device=codes.device) * p.width).view(-1, 1)
        words = (field << shifts).sum(-2)  # disjoint bit fields: the sum is an OR
        byte_shifts = torch.arange(4, device=codes.device) * 8
        chunks.append(((words.unsqueeze(-1) >> byte_shifts) & 255).to(torch.uint8).reshape(*lead, p.nbytes))
    return torch.cat(chunks, dim=-1)


def unpack_codes(packed: torch.Tensor, split: ChannelSplit, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., code_bytes]`` -> ``int64 [..., D]``."""
    lead = packed.shape[:-1]
    codes = torch.zeros(*lead, head_dim, dtype=torch.int64, device=packed.device)
    byte_shifts = torch.arange(4, device=packed.device) * 8
    for p in planes(split, head_dim):
        raw = packed[..., p.byte_offset:p.byte_offset + p.nbytes].long().reshape(*lead, p.words, 4)
        words = (raw << byte_shifts).sum(-1).unsqueeze(-2)  # [..., 1, word]
        shifts = (torch.arange(WORD_BITS // p.width, device=packed.device) * p.width).view(-1, 1)
        field = ((words >> shifts) & ((1 << p.width) - 1)).reshape(*lead, p.channels)
        codes[..., p.first_channel:p.first_channel + p.channels] |= field << p.code_shift
    return codes
