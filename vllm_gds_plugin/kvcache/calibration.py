"""TurboQuant calibration: fixed per-(layer, KV head, channel) centering of K and V, measured offline on real text.

Post-RoPE keys of real models carry a large common component (SmolLM2-135M: ~53% of ||k||^2 on average, up to
71% in a head). TurboQuant's error scales with the norm of what it quantizes, so quantizing ``k - mean`` instead
of ``k`` shrinks every key's error, at no cost in bytes and with no change to attention (quantizer.py explains
why the result is exact). The measured design centers keys only, on their plain mean: centering values, an
attention-weighted or attention-sink key center, and per-channel scales were all measured no better or worse
(docs/turboquant.md), so ``vllm-gds calibrate`` writes identity for those; the format keeps them, and the
quantizer and kernels implement them exactly, so a better estimator needs no new format.

They must be fixed for the engine's lifetime (prefix caching and determinism), so they come from a file written
once per model by ``vllm-gds calibrate MODEL_DIR`` (commands.py) next to the weights:
``turboquant_calibration.tqcal`` with float32 tensors ``key_mean``, ``key_scale``, ``value_mean``,
``value_scale`` of shape ``[num_layers, num_kv_heads, head_dim]`` (scales: per-channel divisors, 1 = none) and
metadata ``format``, ``tokens``, ``source``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

# Safetensors content, but NOT a *.safetensors name: vLLM's default loader and the sharder take every top-level
# *.safetensors file of a model folder without an index as weights (vLLM then fails on "key_mean"); with this
# name both leave it alone, and ``vllm-gds shard`` copies it to OUT like the tokenizer files.
CALIBRATION_FILE = "turboquant_calibration.tqcal"
FORMAT = "vllm-gds-turboquant-calibration/1"


class TurboQuantCalibrationError(ValueError):
    """A calibration file that is missing fields or does not fit the model it is used with."""


@dataclass(frozen=True)
class LayerCalibration:
    """One layer's transforms, float32 ``[H, D]`` each (H = the KV heads of this rank, or 1 for identity)."""

    key_mean: torch.Tensor
    key_scale: torch.Tensor
    value_mean: torch.Tensor
    value_scale: torch.Tensor

    @classmethod
    def identity(cls, head_dim: int) -> "LayerCalibration":
        zero, one = torch.zeros(1, head_dim), torch.ones(1, head_dim)
        return cls(zero, one, zero, one)

    def check(self, num_kv_heads: int, head_dim: int, where: str) -> None:
        for f in fields(self):
            t = getattr(self, f.name)
            if t.dim() != 2 or t.shape[1] != head_dim or t.shape[0] not in (1, num_kv_heads):
                raise TurboQuantCalibrationError(
                    f"{where}: calibration {f.name} has shape {tuple(t.shape)}, expected ({num_kv_heads}, {head_dim})")
            if not torch.isfinite(t).all() or (f.name.endswith("scale") and not (t > 0).all()):
                raise TurboQuantCalibrationError(f"{where}: calibration {f.name} has non-finite or invalid values")

    def to(self, device: torch.device) -> "LayerCalibration":
        return LayerCalibration(*(getattr(self, f.name).float().to(device) for f in fields(self)))


@dataclass(frozen=True)
class TurboQuantCalibration:
    """All layers: tensors ``[num_layers, num_kv_heads, head_dim]`` (same field names as LayerCalibration)."""

    key_mean: torch.Tensor
    key_scale: torch.Tensor
    value_mean: torch.Tensor
    value_scale: torch.Tensor
    tokens: int
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.key_mean.shape)  # type: ignore[return-value]

    def layer(self, layer_index: int, kv_heads: slice = slice(None)) -> LayerCalibration:
        """``layer_index``'s transforms for the KV heads ``kv_heads`` (a tensor-parallel rank's share)."""
        if not 0 <= layer_index < self.shape[0]:
            raise TurboQuantCalibrationError(f"calibration has {self.shape[0]} layers, asked for layer {layer_index}")
        return LayerCalibration(*(getattr(self, f.name)[layer_index, kv_heads] for f in fields(LayerCalibration)))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f.name: getattr(self, f.name).float().contiguous() for f in fields(LayerCalibration)}
        # Atomic, and a private temporary per writer: an engine never reads half a file, and two processes
        # preparing the same model (parallel test sessions) never write into each other's file.
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "tokens": str(self.tokens), "source": self.source})
        tmp.chmod(0o644)  # readable by the serving user, like the weights next to it (safetensors writes 0600)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "TurboQuantCalibration":
        from safetensors import SafetensorError, safe_open

        try:  # safetensors validates the header (offsets, sizes, dtypes) but raises its own Rust error type
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise TurboQuantCalibrationError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
                names = [x.name for x in fields(LayerCalibration)]
                missing = [n for n in names if n not in f.keys()]
                if missing:
                    raise TurboQuantCalibrationError(f"{path}: missing tensors {missing}")
                tensors = {n: f.get_tensor(n).float() for n in names}
        except (SafetensorError, OSError) as e:
            raise TurboQuantCalibrationError(f"{path}: unreadable calibration file: {str(e):.300}") from None
        shapes = {tuple(t.shape) for t in tensors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise TurboQuantCalibrationError(f"{path}: tensors must share one [layers, kv_heads, head_dim] shape, "
                                             f"got {sorted(shapes)}")
        tokens = meta.get("tokens", "0")
        if not (tokens.isascii() and tokens.isdigit()):
            raise TurboQuantCalibrationError(f"{path}: metadata tokens={tokens!r:.50} is not a token count")
        cal = cls(**tensors, tokens=int(tokens), source=meta.get("source", ""))
        for i in range(cal.shape[0]):
            cal.layer(i).check(cal.shape[1], cal.shape[2], f"{path} layer {i}")
        return cal


def find_calibration(model_dir: str | Path) -> TurboQuantCalibration | None:
    """The calibration stored with a model, or None when the folder has none (uncalibrated TurboQuant)."""
    path = Path(model_dir) / CALIBRATION_FILE
    return TurboQuantCalibration.load(path) if path.is_file() else None
