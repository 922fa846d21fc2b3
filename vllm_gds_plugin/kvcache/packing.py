"""Bit packing of quantization codes with no wasted bits, laid out for 32-bit word loads and a register decoder.

A b-bit code is split into bit planes (4 -> [4], 3 -> [2, 1], 2 -> [2], 1 -> [1]). A plane of ``n``
channels fills ``n * w / 32`` little-endian 32-bit words, so 8 3-bit values still take 3 bytes (2 bytes of low
2-bit fields + 1 byte of high bits) and every plane (hence every tensor's code block) is a whole number of words.
Inside a plane, fields are placed so that ONE word, shifted and masked, yields the codes of 8 consecutive channels
as the 8 nibbles of a register, which is what the attention kernel's byte-permute (``prmt``) table lookup consumes
(kernels/turboquant/lut.py):
- 4-bit plane: channel ``i`` in word ``i // 8`` at bit ``4 (i % 8)`` (consecutive nibbles);
- 2-bit plane (alone, or the low bits of a 3-bit code): channel ``i = 16 w + 8 p + k`` in word ``w`` at bit
  ``2 (2 k + p)``, so ``(word >> 2p) & 0x33333333`` puts channel ``16 w + 8 p + k`` in nibble ``k``;
- 1-bit plane (the high bit of a 3-bit code): channel ``i = 16 w + 8 p + k`` in word ``w // 2`` at bit
  ``4 k + 2 (w % 2) + p``, so ``((word >> (2 (w % 2) + p)) << 2) & 0x44444444`` is that nibble's bit 2.
Kernels read the per-channel (word, shift, mask) table built from :func:`planes` in quantizer.py, and the torch
reference packs with the same :meth:`Plane.word_and_bit`, so the layout is defined here only.
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
        """Word index (inside the plane) and bit position of the plane's ``i``-th channel (module docstring)."""
        if self.width == 4:
            return i // 8, 4 * (i % 8)
        k, p, w = i % 8, (i // 8) % 2, i // 16
        if self.width == 2:
            return w, 2 * (2 * k + p)
        return w // 2, 4 * k + 2 * (w % 2) + p

    def layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(word index, bit position) of every channel of the plane, as int64 tensors."""
        word, bit = zip(*(self.word_and_bit(i) for i in range(self.channels)))
        return (torch.tensor(word, dtype=torch.int64, device=device),
                torch.tensor(bit, dtype=torch.int64, device=device))


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
    byte_shifts = torch.arange(4, device=codes.device) * 8
    chunks = []
    for p in planes(split, d):
        field = (codes[..., p.first_channel:p.first_channel + p.channels].long() >> p.code_shift) & ((1 << p.width) - 1)
        word, bit = p.layout(codes.device)
        # disjoint bit fields: the sum is an OR
        words = torch.zeros(*lead, p.words, dtype=torch.int64, device=codes.device).index_add_(-1, word, field << bit)
        chunks.append(((words.unsqueeze(-1) >> byte_shifts) & 255).to(torch.uint8).reshape(*lead, p.nbytes))
    return torch.cat(chunks, dim=-1)


def unpack_codes(packed: torch.Tensor, split: ChannelSplit, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., code_bytes]`` -> ``int64 [..., D]``."""
    lead = packed.shape[:-1]
    codes = torch.zeros(*lead, head_dim, dtype=torch.int64, device=packed.device)
    byte_shifts = torch.arange(4, device=packed.device) * 8
    for p in planes(split, head_dim):
        raw = packed[..., p.byte_offset:p.byte_offset + p.nbytes].long().reshape(*lead, p.words, 4)
        words = (raw << byte_shifts).sum(-1)  # [..., word]
        word, bit = p.layout(packed.device)
        field = (words[..., word] >> bit) & ((1 << p.width) - 1)
        codes[..., p.first_channel:p.first_channel + p.channels] |= field << p.code_shift
    return codes
