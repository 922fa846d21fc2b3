"""KV cache configurations the harness compares: bf16 (the reference), ours (TurboQuant presets) and vLLM's native.

Names on the command line:
- ``bf16``: vLLM's default KV cache (``kv_cache_dtype="auto"`` on a bf16 model), the reference;
- ``turboquant``: the plugin's default preset; any other preset name (``3bit``, ``3.5bit``, ``4bit``, ``k4v3``,
  ``k3v4``, ...) runs ``kv_cache_dtype="turboquant"`` with that preset through ``--additional-config``;
- ``turboquant_4bit_nc``, ``turboquant_k3v4_nc``, ``turboquant_3bit_nc``: vLLM's own TurboQuant KV dtypes, passed
  through unchanged (CUDA builds of vLLM only);
- a ``@N`` suffix (``turboquant@1``) picks the plugin's rotation seed (``{"turboquant": {"seed": N}}``, see
  ``vllm_gds_plugin.kvcache.selection``), to measure seed-to-seed noise; no suffix is the engine's default, seed 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vllm_gds_plugin.kvcache.presets import DEFAULT_PRESET, get_preset

REFERENCE = "bf16"
# vLLM's native presets and their average bits per K/V element (keys and values together).
NATIVE_KV_BITS = {"turboquant_4bit_nc": "k4v4", "turboquant_k3v4_nc": "k3v4", "turboquant_3bit_nc": "k3v3"}
NATIVE_BITS = {"turboquant_4bit_nc": 4.0, "turboquant_k3v4_nc": 3.5, "turboquant_3bit_nc": 3.0}
OURS_DEFAULT = [DEFAULT_PRESET, "4bit", "3.5bit", "3bit", "k4v3", "k3v4", "k4v3.5"]


@dataclass(frozen=True)
class KVConfig:
    label: str
    kv_cache_dtype: str
    avg_bits: float
    family: str  # "reference", "ours" or "native"
    kv_bits: str  # average bits of K and of V, e.g. "k4v3"
    additional_config: dict[str, Any] = field(default_factory=dict)
    preset: str = ""  # the label without its @seed: runs of one preset with different seeds share it
    seed: int | None = None  # the rotation seed of our presets (None: bf16 and native have none)

    def engine_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"kv_cache_dtype": self.kv_cache_dtype}
        if self.additional_config:
            kw["additional_config"] = self.additional_config
        return kw


def parse(label: str) -> KVConfig:
    """A KV configuration from its command-line name (see the module docstring); unknown names raise."""
    if label == REFERENCE:
        return KVConfig(label, "auto", 16.0, "reference", "k16v16", preset=label)
    if label in NATIVE_BITS:
        return KVConfig(label, label, NATIVE_BITS[label], "native", NATIVE_KV_BITS[label], preset=label)
    name, _, seed = label.partition("@")
    preset = get_preset(name)  # TurboQuantConfigError names the valid presets
    section: dict[str, Any] = {"preset": name}
    if seed:
        if not seed.isdigit():
            raise ValueError(f"KV config {label!r}: the seed after '@' must be a non-negative integer")
        section["seed"] = int(seed)
    return KVConfig(label, "turboquant", preset.avg_bits, "ours",
                    f"k{preset.key.avg_bits:g}v{preset.value.avg_bits:g}", {"turboquant": section}, name,
                    int(seed) if seed else 0)


def with_seeds(labels: list[str], seeds: list[int] | None) -> list[str]:
    """Each of our presets named without a seed, once per rotation seed (``turboquant`` -> ``turboquant@0``,
    ``turboquant@1``, ...), seed by seed (a run stopped early has every preset at the first seeds); bf16, vLLM's
    native dtypes and labels that name a seed stay as they are, first."""
    if not seeds:
        return labels
    sweep = [label for label in labels if parse(label).family == "ours" and "@" not in label]
    return [*(label for label in labels if label not in sweep), *(f"{label}@{s}" for s in seeds for label in sweep)]


def default_labels(cuda: bool) -> list[str]:
    """bf16, our presets and, where vLLM ships them (CUDA), vLLM's native TurboQuant dtypes. A preset that is
    another name for an earlier one (``turboquant`` is an alias of a mix) is measured once, under the first name."""
    ours: dict[tuple[object, object], str] = {}
    for name in OURS_DEFAULT:
        p = get_preset(name)
        ours.setdefault((p.key, p.value), name)
    return [REFERENCE, *ours.values(), *(NATIVE_BITS if cuda else [])]


def with_calibration(cfg: KVConfig, calibration: str | None) -> KVConfig:
    """``cfg`` with the plugin's calibration setting (a file, or ``"none"``; None keeps the engine's automatic
    lookup next to the model). Only our presets have one."""
    if calibration is None or cfg.family != "ours":
        return cfg
    return replace(cfg, additional_config={"turboquant": {**cfg.additional_config["turboquant"],
                                                          "calibration": calibration}})
