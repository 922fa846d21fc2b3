"""Which TurboQuant preset an engine runs with.

``--kv-cache-dtype turboquant`` alone gives the default preset (``turboquant``, ~3.5 bits). Another preset is
chosen, in order of precedence, by

1. ``--additional-config '{"turboquant": {"preset": "3bit"}}'`` (``LLM(..., additional_config={...})``), or
2. the environment variable ``VLLM_GDS_TQ_PRESET=3bit`` (inherited by every vLLM process).

Names: ``turboquant``, ``3bit``, ``3.5bit``, ``4bit`` and any ``k<K bits>v<V bits>`` mix such as ``k4v3``
(see ``vllm_gds_plugin.kvcache.presets``). The optional ``"seed"`` (int, default 0) picks the random rotations;
the optional ``"calibration"`` is a calibration file or folder, or ``"none"`` (default: found next to the model;
see ``vllm_gds_plugin.kvcache.calibration_lookup``).
Anything else (an unknown preset, an unknown key, a wrong type) fails engine start with ``TurboQuantConfigError``
naming where the bad value came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_gds_plugin.kvcache.presets import DEFAULT_PRESET, TurboQuantConfigError, TurboQuantPreset, get_preset

PRESET_ENV = "VLLM_GDS_TQ_PRESET"
CONFIG_KEY = "turboquant"
_KEYS = {"preset", "seed", "calibration"}


@dataclass(frozen=True)
class TurboQuantSelection:
    preset: TurboQuantPreset
    seed: int
    source: str  # where the preset name came from, for logs and errors
    calibration: str | None = None  # None: automatic lookup; "none": off; else a file or folder path


def select(additional_config: Mapping[str, Any] | None) -> TurboQuantSelection:
    """Preset and seed from vLLM's ``additional_config`` and the environment (see module docstring)."""
    section = (additional_config or {}).get(CONFIG_KEY, {})
    where = f"--additional-config {CONFIG_KEY!r}"
    if not isinstance(section, Mapping):
        raise TurboQuantConfigError(f"{where} must be an object like {{\"preset\": \"3bit\"}}, got {section!r}")
    unknown = set(section) - _KEYS
    if unknown:
        raise TurboQuantConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(_KEYS)}")
    seed = section.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TurboQuantConfigError(f"{where}: \"seed\" must be an integer, got {seed!r}")
    calibration = section.get("calibration")
    if calibration is not None and not (isinstance(calibration, str) and calibration):
        raise TurboQuantConfigError(f"{where}: \"calibration\" must be a file path or \"none\", got {calibration!r}")
    if "preset" in section:
        name, source = section["preset"], f"{where} preset"
    elif os.environ.get(PRESET_ENV):
        name, source = os.environ[PRESET_ENV], f"environment variable {PRESET_ENV}"
    else:
        name, source = DEFAULT_PRESET, "default"
    if not isinstance(name, str):
        raise TurboQuantConfigError(f"{source}: preset must be a string, got {name!r}")
    try:
        preset = get_preset(name)
    except TurboQuantConfigError as e:
        raise TurboQuantConfigError(f"{source}: {e}") from None
    return TurboQuantSelection(preset, seed, source, calibration)
