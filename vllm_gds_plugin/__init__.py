"""vllm-gds-plugin: pre-sharded FP8 cold start and a TurboQuant 3-4 bit KV cache for vLLM.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process it starts (API
server, engine core, each worker). It must therefore be idempotent and import-light: no Triton, no CUDA
initialisation, nothing that would be unsafe before workers fork or spawn.
"""

from __future__ import annotations

import logging
import os

__version__ = "0.1.0"
__all__ = ["register", "__version__"]

log = logging.getLogger("vllm_gds_plugin")
_registered = False

# Set to a file path to have every process that runs register() append "pid<TAB>version" to it
# (used by the tests to prove the plugin runs in each vLLM process; harmless otherwise).
TRACE_ENV = "VLLM_GDS_TRACE_REGISTER"


def register() -> None:
    """Entry point for ``vllm.general_plugins``: hook the plugin's features into vLLM, once per process."""
    global _registered
    if _registered:
        return
    from vllm_gds_plugin.compat import check_supported_vllm, install_all, installed_vllm_version

    check_supported_vllm()
    install_all()
    _registered = True
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\t{installed_vllm_version()}\n")
    log.debug("vllm-gds-plugin %s registered in pid %d", __version__, os.getpid())
