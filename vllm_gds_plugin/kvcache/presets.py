"""TurboQuant presets: how many bits keys and values get, and the paged-cache slot layout they imply.

A fractional rate gives the first half of the rotated coordinates one more bit than the second half (3.5 bits =
half at 4 bits, half at 3). After the random rotation all coordinates are exchangeable, so this is an average rate, not the
paper's original-domain outlier split (two instances, two norms); outlier energy is handled instead by the
calibrated key centering (calibration.py; measurements in docs/turboquant.md). Keys and values have independent
rates; the default ``turboquant`` = K4V3 measured better than K3.5V3.5 at the same bytes.

Slot layout per token per KV head (uint8): ``[K codes | V codes | K norm | V norm]``, all 4-byte aligned. Codes are
bit-packed with no wasted bits (see packing.py). Norms are stored as bf16 (2 bytes): the norm scales the whole vector, so its
rounding error is coherent, but bf16's 2^-9 relative error is still ~40x below the 3.5-bit code error on an
attention logit, and bf16 covers every K/V a bf16 or fp16 model can produce, where fp16 would overflow above
65504 (possible for a norm of 256 fp16-range coordinates) and need a silent clamp.

| preset | K bits | V bits | bytes/token/KV head, D=64 | D=128 | D=256 | vs bf16 (D=128: 512 B) |
|---|---|---|---|---|---|---|
| k3v3 (alias 3bit) | 3 | 3 | 52 | 100 | 196 | 5.12x |
| k3.5v3.5 (alias 3.5bit) | 3.5 | 3.5 | 60 | 116 | 228 | 4.41x |
| k4v3 | 4 | 3 | 60 | 116 | 228 | 4.41x |
| k4v4 (alias 4bit) | 4 | 4 | 68 | 132 | 260 | 3.88x |
(``python -m vllm_gds_plugin.kvcache.presets`` prints the full table.)
"""

from __future__ import annotations

from dataclasses import dataclass

NORM_BYTES = 2  # one bf16 norm per vector
SUPPORTED_HEAD_DIMS = (64, 128, 256)
_RATES = ("2", "2.5", "3", "3.5", "4")  # per-tensor average bits we offer: integer or integer + 1/2
DEFAULT_PRESET = "turboquant"
# The measured quality-neutral ~3.5-bit mix (see docs/turboquant.md for the perplexity table that chose it).
_DEFAULT_MIX = "k4v3"
_ALIASES = {"3bit": "k3v3", "3.5bit": "k3.5v3.5", "4bit": "k4v4", DEFAULT_PRESET: _DEFAULT_MIX}


class TurboQuantConfigError(ValueError):
    """A preset name or a head_dim that TurboQuant does not support."""


@dataclass(frozen=True)
class ChannelSplit:
    """Bits for one tensor (K or V): the first ``frac_hi`` of the rotated coordinates get ``bits_hi``."""

    bits_hi: int
    bits_lo: int
    frac_hi: float

    @classmethod
    def from_rate(cls, rate: str) -> "ChannelSplit":
        r = float(rate)
        lo = int(r)
        return cls(lo + 1, lo, 0.5) if r != lo else cls(lo, lo, 0.0)

    @property
    def avg_bits(self) -> float:
        return self.frac_hi * self.bits_hi + (1 - self.frac_hi) * self.bits_lo

    def groups(self, head_dim: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(first channel, channel count, bits) of the two halves of the rotated coordinates. Every tensor is
        packed as two independent halves, equal bits or not, so that the attention kernel handles every preset
        as two tensor-core dots of D/2 channels with the bits fixed per half."""
        if self.frac_hi not in (0.0, 0.5):
            raise TurboQuantConfigError(f"the high-bit fraction must be 0 or 1/2, got {self.frac_hi}")
        half = head_dim // 2
        return (0, half, self.bits_hi if self.frac_hi else self.bits_lo), (half, half, self.bits_lo)

    def code_bytes(self, head_dim: int) -> int:
        return sum(n * b for _, n, b in self.groups(head_dim)) // 8


@dataclass(frozen=True)
class TurboQuantPreset:
    name: str
    key: ChannelSplit
    value: ChannelSplit
    # One rotation per layer shared by all KV heads (True: an independent rotation per KV head).
    per_head_rotation: bool = False

    @property
    def avg_bits(self) -> float:
        return 0.5 * (self.key.avg_bits + self.value.avg_bits)

    def key_bytes(self, head_dim: int) -> int:
        check_head_dim(head_dim)
        return self.key.code_bytes(head_dim) + NORM_BYTES

    def value_bytes(self, head_dim: int) -> int:
        check_head_dim(head_dim)
        return self.value.code_bytes(head_dim) + NORM_BYTES

    def slot_bytes(self, head_dim: int) -> int:
        """Bytes per token per KV head for K and V together, norms included."""
        return self.key_bytes(head_dim) + self.value_bytes(head_dim)


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise TurboQuantConfigError(
            f"TurboQuant KV cache supports head_dim {SUPPORTED_HEAD_DIMS}, got {head_dim}")


def preset_names() -> list[str]:
    mixes = [f"k{k}v{v}" for k in _RATES for v in _RATES]
    return [DEFAULT_PRESET, *[a for a in _ALIASES if a != DEFAULT_PRESET], *mixes]


def get_preset(name: str) -> TurboQuantPreset:
    """Preset by name: ``turboquant`` (default), ``3bit``/``3.5bit``/``4bit``, or ``k<bits>v<bits>``."""
    canonical = _ALIASES.get(name, name)
    if canonical.startswith("k") and "v" in canonical:
        k, v = canonical[1:].split("v", 1)
        if k in _RATES and v in _RATES:
            return TurboQuantPreset(name, ChannelSplit.from_rate(k), ChannelSplit.from_rate(v))
    raise TurboQuantConfigError(
        f"unknown TurboQuant preset {name!r}; valid: {', '.join(preset_names())}")


def table(head_dims: tuple[int, ...] = SUPPORTED_HEAD_DIMS) -> str:
    rows = ["| preset | K bits | V bits | " + " | ".join(f"bytes D={d} (bf16 {4 * d})" for d in head_dims) + " |"]
    rows.append("|" + "---|" * (3 + len(head_dims)))
    for name in preset_names():
        p = get_preset(name)
        sizes = " | ".join(f"{p.slot_bytes(d)} ({4 * d / p.slot_bytes(d):.2f}x)" for d in head_dims)
        rows.append(f"| {name} | {p.key.avg_bits:g} | {p.value.avg_bits:g} | {sizes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
