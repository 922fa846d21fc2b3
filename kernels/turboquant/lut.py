"""Codebook lookup in registers: PTX that turns one packed code word into 8 bf16/fp16 codebook values.

The attention kernel is bound by instruction issue, not by memory: a gather from a table in L1 costs an address
computation (64-bit in Triton), a load and a conversion per value. ``prmt`` (byte permute) instead selects 4 bytes
out of 8 held in two registers by 4 nibble selectors, i.e. a table lookup of 4 values at once. A 16-bit codebook
value is two bytes, so each 8-entry table is held as its low bytes (2 registers) and high bytes (2 registers), and
two ``prmt`` interleave the looked-up bytes into bf16x2 pairs. The packed layout (kvcache/packing.py) puts the codes
of 8 consecutive channels in the 8 nibbles of one (shifted, masked) word, so the selectors come straight from it.

- 4 bits: 16 entries do not fit in one 8-byte table, but Lloyd-Max codebooks are symmetric (``c[15-k] = -c[k]``,
  asserted below), so the table holds the 8 magnitudes, the nibble's top bit gives the sign, and a third ``prmt``
  in sign-replicate mode turns the sign bits into byte masks. About 20 instructions per 8 values.
- 2 and 3 bits: at most 8 entries, the selector is the code itself (2-bit low plane + 1-bit high plane).

The torch reference (naive.py) and the portable Triton path read the same codebook as float32 tables; the values
produced here are those floats rounded to the dot dtype, exactly what the portable path's ``.to(dtype)`` gives.
"""

from __future__ import annotations

import torch

# Register constraints: 8 16-bit outputs, then the inputs.
CONSTRAINTS_4BIT = "=h,=h,=h,=h,=h,=h,=h,=h,r"  # the code word
CONSTRAINTS_PLANES = ",".join(["=h"] * 16 + ["r"] * 3)  # 16 outputs; low-plane word, high-plane word, its shift


def _table_words(values: list[float], dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(low bytes of entries 0-3, of 4-7, high bytes of 0-3, of 4-7) of up to 8 values as ``dtype`` bits."""
    padded = values + [0.0] * (8 - len(values))
    bits = torch.tensor(padded, dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    lo = [int(b) & 0xFF for b in bits]
    hi = [int(b) >> 8 for b in bits]

    def word(bytes4: list[int]) -> int:
        return sum(b << (8 * i) for i, b in enumerate(bytes4))

    return word(lo[:4]), word(lo[4:]), word(hi[:4]), word(hi[4:])


def _emit_pairs(sel: str, out: int) -> str:
    """Look up nibbles 0-3 of ``sel`` in the tables, write outputs ``$out .. $out+3``."""
    return (f"prmt.b32 l, tl0, tl1, {sel};\n prmt.b32 h, th0, th1, {sel};\n"
            f"{{SIGN}}"
            f"prmt.b32 y, l, h, 0x5140;\n mov.b32 {{${out}, ${out + 1}}}, y;\n"
            f"prmt.b32 y, l, h, 0x7362;\n mov.b32 {{${out + 2}, ${out + 3}}}, y;\n")


def _tables(words: tuple[int, int, int, int]) -> str:
    tl0, tl1, th0, th1 = words
    return (f"mov.b32 tl0, {tl0:#x};\n mov.b32 tl1, {tl1:#x};\n"
            f"mov.b32 th0, {th0:#x};\n mov.b32 th1, {th1:#x};\n")


def asm_4bit(centroids: list[float], dtype: torch.dtype) -> str:
    """PTX: ``$8`` = a 4-bit plane word (ascending codes 0..15) -> ``$0..$7`` = its 8 values."""
    assert len(centroids) == 16 and all(centroids[15 - k] == -centroids[k] for k in range(16)), \
        "the 4-bit register lookup needs a symmetric codebook"
    sign = "prmt.b32 t, 0x8000, 0, s;\n and.b32 t, t, 0x80808080;\n or.b32 h, h, t;\n"
    return ("{\n.reg .b32 n, x, s, l, h, t, y, tl0, tl1, th0, th1;\n"
            + _tables(_table_words(centroids[8:], dtype))
            # code k >= 8 is +c[k] = magnitude k - 8; k < 8 is -c[15 - k] = -(magnitude 7 - k)
            + "not.b32 n, $8;\n shr.b32 n, n, 3;\n and.b32 n, n, 0x11111111;\n"  # 1 per negative nibble
            + "mul.lo.u32 x, n, 7;\n xor.b32 x, x, $8;\n and.b32 x, x, 0x77777777;\n"  # magnitude index
            + "or.b32 s, n, 0x88888888;\n"  # sign-replicate selectors: byte 1 (0x80) if negative, byte 0 (0x00)
            + _emit_pairs("x", 0).replace("{SIGN}", sign)
            + "shr.b32 x, x, 16;\n shr.b32 s, s, 16;\n"
            + _emit_pairs("x", 4).replace("{SIGN}", sign)
            + "}")


def asm_planes(centroids: list[float], dtype: torch.dtype) -> str:
    """PTX for 2- and 3-bit codes of the 16 channels of one low-plane word: ``$16`` = that word, ``$17`` = the
    high-plane word holding their high bits (0 for 2 bits), ``$18`` = its shift (packing.py) -> ``$0..$15``."""
    assert len(centroids) <= 8
    half = ("shr.b32 x, $16, {lo};\n and.b32 x, x, 0x33333333;\n"  # low 2 bits of 8 channels, one per nibble
            "shl.b32 u, t, {hi};\n and.b32 u, u, 0x44444444;\n or.b32 x, x, u;\n")  # + their high bit
    return ("{\n.reg .b32 x, u, t, l, h, y, tl0, tl1, th0, th1;\n"
            + _tables(_table_words(centroids, dtype))
            + "shr.b32 t, $17, $18;\n"
            + "".join(half.format(lo=2 * p, hi=2 - p)
                      + _emit_pairs("x", 8 * p).replace("{SIGN}", "")
                      + "shr.b32 x, x, 16;\n"
                      + _emit_pairs("x", 8 * p + 4).replace("{SIGN}", "") for p in (0, 1))
            + "}")
