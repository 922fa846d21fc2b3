"""Codebook lookup in registers: PTX that turns one packed code word into 8 fp16 codebook values.

The attention kernel is bound by instruction issue, not by memory: a gather from a table in L1 costs an address
computation (64-bit in Triton), a load and a conversion per value. ``prmt`` (byte permute) instead selects 4 bytes
out of 8 held in two registers by 4 nibble selectors, i.e. a table lookup of 4 values at once. The cache's codebooks
are ``s * v`` with every ``v`` an fp8 e4m3 number (quantizer.e4m3_codebook), so an 8-entry table of ``v`` is 8 bytes
and one ``prmt`` looks up 4 values; ``cvt.rn.f16x2.e4m3x2`` turns each pair into fp16 (the kernel multiplies ``s``
into the query, for K, and into the output, for V). The packed layout (kvcache/packing.py) puts the codes of 8
consecutive channels in the 8 nibbles of one (shifted, masked) word, so the selectors come straight from it.
(A 16-bit table needs two ``prmt`` per 4 values for the low and high bytes and two more to interleave them, and
each table register is a constant that ptxas re-materializes before use when registers are short.)

- 4 bits: 16 entries do not fit in one 8-byte table, but Lloyd-Max codebooks are symmetric (``v[15-k] = -v[k]``,
  asserted below), so the table holds the 8 magnitudes and the nibble's top bit gives the sign, moved to bit 7 of
  its byte (e4m3's sign bit) by two shifts and a ``prmt``.
- 2 and 3 bits: at most 8 entries, the selector is the code itself (2-bit low plane + 1-bit high plane).

The torch reference (naive.py) and the portable Triton path read the same codebook as float32 tables ``s * v``.
"""

from __future__ import annotations

import torch

# Register constraints: 8 16-bit outputs, then the inputs.
CONSTRAINTS_4BIT = "=h,=h,=h,=h,=h,=h,=h,=h,r"  # the code word
CONSTRAINTS_PLANES = ",".join(["=h"] * 16 + ["r"] * 3)  # 16 outputs; low-plane word, high-plane word, its shift


def _table_words(values: torch.Tensor) -> tuple[int, int]:
    """(e4m3 bytes of entries 0-3, of 4-7) of up to 8 e4m3-exact values."""
    padded = torch.zeros(8, dtype=torch.float64)
    padded[:values.numel()] = values
    b = padded.to(torch.float8_e4m3fn)
    assert torch.equal(b.to(torch.float64), padded), "codebook values must be e4m3 numbers"
    bits = [int(x) for x in b.view(torch.uint8)]
    return sum(x << (8 * i) for i, x in enumerate(bits[:4])), sum(x << (8 * i) for i, x in enumerate(bits[4:]))


def _emit_quad(sel: str, out: int, sign: str = "") -> str:
    """Look up nibbles 0-3 of ``sel`` in the table (t0, t1), OR in ``sign``'s bytes if given, convert, and write
    outputs ``$out .. $out+3``."""
    return (f"prmt.b32 g, t0, t1, {sel};\n"
            + (f"and.b32 s, {sign}, 0x80808080;\n or.b32 g, g, s;\n" if sign else "")
            + "mov.b32 {a, b}, g;\n"
            f"cvt.rn.f16x2.e4m3x2 y, a;\n mov.b32 {{${out}, ${out + 1}}}, y;\n"
            f"cvt.rn.f16x2.e4m3x2 y, b;\n mov.b32 {{${out + 2}, ${out + 3}}}, y;\n")


def _table(values: torch.Tensor) -> str:
    t0, t1 = _table_words(values)
    return f"mov.b32 t0, {t0:#x};\n mov.b32 t1, {t1:#x};\n"


def asm_4bit(values: torch.Tensor) -> str:
    """PTX: ``$8`` = a 4-bit plane word (ascending codes 0..15 of the e4m3 codebook ``values``) -> ``$0..$7`` =
    its 8 values as fp16."""
    assert values.numel() == 16 and torch.equal(values.flip(0), -values), \
        "the 4-bit register lookup needs a symmetric codebook"
    return ("{\n.reg .b32 n, x, m7, m3, s, g, y, t0, t1;\n.reg .b16 a, b;\n"
            + _table(values[8:])
            # code k >= 8 is +v[k] = magnitude k - 8; k < 8 is -v[15 - k] = -(magnitude 7 - k)
            + "not.b32 n, $8;\n shr.b32 n, n, 3;\n and.b32 n, n, 0x11111111;\n"  # 1 per negative nibble
            + "mul.lo.u32 x, n, 7;\n xor.b32 x, x, $8;\n and.b32 x, x, 0x77777777;\n"  # magnitude index
            # nibble i's flag (bit 4 i) to bit 7 of a byte: i even via << 7, i odd via << 3; prmt orders the bytes
            + "shl.b32 m7, n, 7;\n shl.b32 m3, n, 3;\n"
            + "prmt.b32 s, m7, m3, 0x5140;\n" + _emit_quad("x", 0, sign="s")
            + "shr.b32 x, x, 16;\n prmt.b32 s, m7, m3, 0x7362;\n" + _emit_quad("x", 4, sign="s")
            + "}")


def asm_planes(values: torch.Tensor) -> str:
    """PTX for 2- and 3-bit codes (e4m3 codebook ``values``) of the 16 channels of one low-plane word: ``$16`` =
    that word, ``$17`` = the high-plane word holding their high bits (0 for 2 bits), ``$18`` = its shift
    (packing.py) -> ``$0..$15`` as fp16."""
    assert values.numel() <= 8
    half = ("shr.b32 x, $16, {lo};\n and.b32 x, x, 0x33333333;\n"  # low 2 bits of 8 channels, one per nibble
            "shl.b32 u, t, {hi};\n and.b32 u, u, 0x44444444;\n or.b32 x, x, u;\n")  # + their high bit
    return ("{\n.reg .b32 x, u, t, g, y, t0, t1;\n.reg .b16 a, b;\n"
            + _table(values)
            + "shr.b32 t, $17, $18;\n"
            + "".join(half.format(lo=2 * p, hi=2 - p)
                      + _emit_quad("x", 8 * p)
                      + "shr.b32 x, x, 16;\n"
                      + _emit_quad("x", 8 * p + 4) for p in (0, 1))
            + "}")
