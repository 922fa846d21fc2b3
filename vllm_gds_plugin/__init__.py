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

log = logging.getLogger("vllm.gds_plugin")  # under vLLM's logger: its format and handlers
_registered = False

# Set to a file path to have every process that runs register() append "pid<TAB>version" to it
# (used by the tests to prove the plugin runs in each vLLM process; harmless otherwise).
TRACE_ENV = "VLLM_GDS_TRACE_REGISTER"


def register() -> None:
    """Entry point for ``vllm.general_plugins``: hook the plugin's features into vLLM, once per process.

    Outside the supported vLLM series it hooks nothing and says so in one warning: vLLM calls general plugins
    without a try, so raising here would stop every ``vllm serve`` of a deployment that merely has the plugin
    installed (vLLM 0.33 and 0.34 are out), including the ones that use none of its features."""
    global _registered
    if _registered:
        return
    from vllm_gds_plugin.compat import UnsupportedVLLMVersion, check_supported_vllm, install_all, installed_vllm_version

    _registered = True
    try:
        check_supported_vllm()
    except UnsupportedVLLMVersion as e:
        log.warning("%s The plugin stays inactive: vLLM runs as without it, and --load-format gds-sharded and "
                    "--kv-cache-dtype turboquant are not available.", e)
        return
    install_all()
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\t{installed_vllm_version()}\n")
    log.debug("vllm-gds-plugin %s registered in pid %d", __version__, os.getpid())
