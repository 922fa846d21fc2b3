"""The register codebook lookup (kernels/turboquant/lut.py) decodes every code as the codebook says.

Its PTX runs only on a GPU, inside the attention kernel, so here a small interpreter of the few instructions it
uses (bitwise ops, ``prmt``, ``cvt.rn.f16x2.e4m3x2``; PTX ISA semantics) runs the exact strings the kernel is
compiled with on every nibble value and on random words, against ``quantizer.e4m3_codebook``.
"""

from __future__ import annotations

import re

import pytest
import torch

from vllm_gds_plugin.kernels.turboquant import lut
from vllm_gds_plugin.kvcache.quantizer import e4m3_codebook

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    """prmt.b32 default mode: byte i of the result is byte (nibble i of sel) & 7 of {b, a}, or with bit 3 of the
    nibble set, that byte's sign bit replicated."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _e4m3x2_to_f16x2(v: int) -> int:
    pair = torch.tensor([v & 0xFF, v >> 8], dtype=torch.uint8).view(torch.float8_e4m3fn)
    h = pair.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(h[0]) | int(h[1]) << 16


def run_ptx(asm: str, inputs: dict[str, int], outputs: int) -> list[int]:
    """Execute ``asm`` (one ``{ ... }`` block) with ``$n`` inputs; returns the 16-bit outputs ``$0..``."""
    regs: dict[str, int] = dict(inputs)

    def val(x: str) -> int:
        x = x.strip()
        return int(x, 0) & MASK if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", x) else regs[x]

    for line in asm.replace("\n", " ").split(";"):
        line = line.strip().lstrip("{").strip()
        if not line or line.startswith(".reg") or line == "}":
            continue
        op, rest = line.split(None, 1)
        vec = re.fullmatch(r"\{\s*(\S+)\s*,\s*(\S+)\s*\}\s*,\s*(\S+)", rest)
        if op == "mov.b32" and vec:  # split a 32-bit register into 16-bit halves (low first)
            lo, hi, src = vec.groups()
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        d, *args = [a.strip() for a in rest.split(",")]
        a = [val(x) for x in args]
        regs[d] = {
            "mov.b32": lambda: a[0],
            "not.b32": lambda: ~a[0] & MASK,
            "shr.b32": lambda: a[0] >> a[1] if a[1] < 32 else 0,
            "shl.b32": lambda: (a[0] << a[1]) & MASK if a[1] < 32 else 0,
            "and.b32": lambda: a[0] & a[1],
            "or.b32": lambda: a[0] | a[1],
            "xor.b32": lambda: a[0] ^ a[1],
            "mul.lo.u32": lambda: (a[0] * a[1]) & MASK,
            "prmt.b32": lambda: _prmt(a[0], a[1], a[2]),
            "cvt.rn.f16x2.e4m3x2": lambda: _e4m3x2_to_f16x2(a[0]),
        }[op]()
    return [regs[f"${i}"] for i in range(outputs)]


def _as_float(h: list[int]) -> list[float]:
    return torch.tensor(h, dtype=torch.int32).to(torch.int16).view(torch.float16).tolist()


def _words(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64).tolist()
    return [0x76543210, 0xFEDCBA98, 0x0F1E2D3C, 0x89ABCDEF, 0, MASK] + rand


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_4bit_lookup_decodes_every_nibble(head_dim: int) -> None:
    s, v = e4m3_codebook(head_dim, 4)
    asm = lut.asm_4bit(v)
    for w in _words(200, head_dim):
        got = _as_float(run_ptx(asm, {"$8": w}, 8))
        assert got == [float(v[(w >> 4 * f) & 15]) for f in range(8)], hex(w)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_plane_lookup_decodes_every_code(head_dim: int, bits: int) -> None:
    s, v = e4m3_codebook(head_dim, bits)
    asm = lut.asm_planes(v)
    words = _words(100, bits * head_dim)
    for lo, hi in zip(words, reversed(words)):
        hi = hi if bits == 3 else 0
        for shift in (0, 2):  # the high-plane word is shared by two low-plane words (packing.py)
            got = _as_float(run_ptx(asm, {"$16": lo, "$17": hi, "$18": shift}, 16))
            want = [float(v[((lo >> (4 * k + 2 * p)) & 3) | ((hi >> shift >> (4 * k + p)) & 1) << 2])
                    for p in (0, 1) for k in range(8)]
            assert got == want, (hex(lo), hex(hi), shift)


def test_codebooks_are_the_lookups_values_times_their_scale() -> None:
    """The reference's codebook (what the store quantizes to) is s * v with v exact in e4m3 and fp16."""
    for head_dim in (64, 128, 256):
        for bits in (2, 3, 4):
            s, v = e4m3_codebook(head_dim, bits)
            assert 0.5 < s <= 1.0
            assert torch.equal(v.to(torch.float8_e4m3fn).to(torch.float64), v)
            assert torch.equal(v.to(torch.float16).to(torch.float64), v)
