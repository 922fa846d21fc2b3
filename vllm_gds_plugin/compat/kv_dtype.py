"""Make the bare KV cache dtype name ``turboquant`` valid in vLLM's CLI and Python API.

vLLM 0.26 and 0.32 validate ``--kv-cache-dtype`` / ``LLM(kv_cache_dtype=...)`` against a closed
``typing.Literal`` (``vllm.config.cache.CacheDType``). That literal is consumed in four places that each need
to learn the new name:

1. pydantic's schema of ``CacheConfig`` (built when the class was decorated, so it must be rebuilt);
2. the argparse ``choices`` that ``EngineArgs.add_cli_args`` derives from the ``CacheConfig`` field type
   (memoised by ``vllm.engine.arg_utils._compute_kwargs``'s ``lru_cache``, so the cache must be cleared);
3. ``STR_DTYPE_TO_TORCH_DTYPE`` (the paged cache is raw bytes: ``torch.uint8``);
4. modules that did ``from vllm.config.cache import CacheDType`` and check ``get_args(CacheDType)`` at run time
   (the attention selector), so every already-imported module's own binding is replaced too.

The name is deliberately not ``turboquant_<x>``: vLLM's own code treats that prefix as its native TurboQuant
(``get_kv_quant_mode``, ``TurboQuantConfig.from_cache_dtype``, FA2 checks, boundary-layer skipping). With the bare
name ``get_kv_quant_mode`` answers ``KVQuantMode.NONE`` and vLLM leaves the layout entirely to our backend.

vLLM 0.33 adds an official registry (``vllm.config.cache.register_kv_cache_dtype`` + the ``KVCacheDTypeHandler``
protocol: ``name``, ``torch_dtype()``, ``quant_mode()``; checked against the 0.33.0 wheel's source); when a running
vLLM exposes it, :func:`install` uses it instead of patching. The plugin does not run on 0.33 yet (compat/version.py)
and this path has not run in an engine.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, get_args

TQ_KV_CACHE_DTYPE = "turboquant"

_installed = False


def is_turboquant(kv_cache_dtype: object) -> bool:
    """True for exactly our dtype name (not vLLM's native ``turboquant_*`` presets)."""
    return kv_cache_dtype == TQ_KV_CACHE_DTYPE


def install() -> None:
    """Accept ``turboquant`` wherever vLLM validates a KV cache dtype. Idempotent; imports no Triton."""
    global _installed
    if _installed:
        return
    if not _install_via_registry():
        _patch_cache_dtype_literal()
        _patch_dtype_table()
    _installed = True


def _install_via_registry() -> bool:
    """Use vLLM's official custom-dtype registry when present (vLLM >= 0.33). False when absent."""
    import vllm.config.cache as cache

    register = getattr(cache, "register_kv_cache_dtype", None)
    if register is None:
        return False
    register(TQ_KV_CACHE_DTYPE)(_handler_class())
    return True


def _handler_class() -> type:
    """A handler for vLLM 0.33's ``KVCacheDTypeHandler`` protocol (raw bytes; the backend owns dispatch)."""
    import torch

    from vllm.v1.kv_cache_interface import KVQuantMode

    class TurboQuantDTypeHandler:
        name = TQ_KV_CACHE_DTYPE

        def torch_dtype(self) -> torch.dtype:
            return torch.uint8

        def quant_mode(self) -> Any:
            # NONE, what 0.26 and 0.32 answer for the bare name. Not the protocol's KVQuantMode.CUSTOM ("the
            # backend dispatches"): in 0.33.0 it is an alias of OCTAVE_K3V4 (both 12), so is_octave would be True.
            return KVQuantMode.NONE

    return TurboQuantDTypeHandler


def _patch_cache_dtype_literal() -> None:
    import dataclasses

    import pydantic

    import vllm.config.cache as cache_mod

    old = cache_mod.CacheDType
    if TQ_KV_CACHE_DTYPE in get_args(old):
        return
    new = Literal[get_args(old) + (TQ_KV_CACHE_DTYPE,)]  # type: ignore[valid-type]

    # Every module holding its own reference to the old literal (selector.py checks get_args() at run time).
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("vllm") and getattr(module, "CacheDType", None) is old:
            module.CacheDType = new  # type: ignore[attr-defined]

    config_cls = cache_mod.CacheConfig
    config_cls.__annotations__["cache_dtype"] = new
    config_cls.__dataclass_fields__["cache_dtype"].type = new
    pydantic.dataclasses.rebuild_dataclass(config_cls, force=True)

    from vllm.engine import arg_utils

    for field in dataclasses.fields(arg_utils.EngineArgs):
        if field.name == "kv_cache_dtype":
            field.type = new
    # argparse choices are derived from the field type and memoised.
    arg_utils._compute_kwargs.cache_clear()


def _patch_dtype_table() -> None:
    import torch

    from vllm.utils import torch_utils

    torch_utils.STR_DTYPE_TO_TORCH_DTYPE.setdefault(TQ_KV_CACHE_DTYPE, torch.uint8)
