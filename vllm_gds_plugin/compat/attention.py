"""Route ``--kv-cache-dtype turboquant`` to the plugin's attention backend and size the KV cache from it.

- Routing: every vLLM platform picks a backend in ``Platform.get_attn_backend_cls`` (the CPU platform always
  answers CPU_ATTN, CUDA ranks its own list). We wrap that classmethod on the running platform: for our dtype
  it returns our backend's path after refusing what the backend cannot do, with a message that says so. The
  backend is registered as ``AttentionBackendEnum.CUSTOM`` because vLLM maps ``backend.get_name()`` back to
  that enum.
- Sizing: vLLM derives the KV cache page (hence "KV cache size ... tokens") from each layer's spec. vLLM 0.32
  asks the backend (``customize_spec``). vLLM 0.26 has no hook, so we wrap ``Attention.get_kv_cache_spec`` to
  apply the same ``customize_spec`` for layers on our backend; nothing else of 0.26 is patched.

No Triton (and no plugin kernel) is imported here: the backend module is loaded by vLLM when selected.
"""

from __future__ import annotations

from typing import Any

from vllm_gds_plugin.compat.kv_dtype import TQ_KV_CACHE_DTYPE, is_turboquant
from vllm_gds_plugin.compat.kv_dtype import install as install_kv_dtype

BACKEND_PATH = "vllm_gds_plugin.kvcache.backend.TurboQuantBackend"
_MARK = "_vllm_gds_tq_wrapped"
_installed = False


def install() -> None:
    """Accept the dtype, register and route the backend, size the cache. Idempotent."""
    global _installed
    if _installed:
        return
    install_kv_dtype()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _route_platform()
    _size_on_026()
    _installed = True


def refusal(cfg: Any) -> str | None:
    """Why our backend cannot serve a layer with this ``AttentionSelectorConfig`` (None: it can)."""
    from vllm_gds_plugin.kvcache.presets import SUPPORTED_HEAD_DIMS

    import torch

    checks = [
        (cfg.use_mla, "MLA attention"),
        (getattr(cfg, "use_sparse", False), "sparse attention"),
        (cfg.has_sink, "attention sinks"),
        (getattr(cfg, "has_sliding_window", False), "sliding-window attention layers"),
        (getattr(cfg, "use_mm_prefix", False), "bidirectional multimodal prefixes"),
        (getattr(cfg, "use_non_causal", False), "non-causal attention"),
        (getattr(cfg, "use_per_head_quant_scales", False), "per-head KV quantization scales"),
        (getattr(cfg, "use_dcp", False) or getattr(cfg, "use_pcp", False), "context parallelism"),
        # vLLM's own backends refuse these three unless they opt in (AttentionBackend.validate_configuration); a
        # routed backend is not validated by vLLM, so the checks are here.
        (getattr(cfg, "use_rswa", False), "R-SWA (reference sliding-window) attention"),
        (getattr(cfg, "use_batch_invariant", False),
         "VLLM_BATCH_INVARIANT=1 (the decode kernel's KV split count follows the batch size)"),
        (getattr(cfg, "use_adaptive_verification", False),
         "adaptive speculative verification (it trims query lengths on the GPU; prefill is planned from the CPU's)"),
        (cfg.attn_type != "decoder", f"{cfg.attn_type!s} attention (decoder layers only)"),
        (cfg.head_size not in SUPPORTED_HEAD_DIMS, f"head_dim {cfg.head_size} (supported: {SUPPORTED_HEAD_DIMS})"),
        (cfg.dtype not in (torch.float16, torch.bfloat16), f"model dtype {cfg.dtype} (float16/bfloat16 only)"),
    ]
    reasons = [why for bad, why in checks if bad]
    return ", ".join(reasons) if reasons else None


def _route_platform() -> None:
    from vllm.platforms import current_platform

    from vllm_gds_plugin.kvcache.presets import TurboQuantConfigError

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls
    if getattr(original, _MARK, False):
        return

    def get_attn_backend_cls(cls: type, selected_backend: Any, attn_selector_config: Any, *args: Any,
                             **kwargs: Any) -> str:
        if not is_turboquant(attn_selector_config.kv_cache_dtype):
            return original(selected_backend, attn_selector_config, *args, **kwargs)
        why = refusal(attn_selector_config)
        if why:
            raise TurboQuantConfigError(
                f"--kv-cache-dtype {TQ_KV_CACHE_DTYPE} does not support {why}; use another --kv-cache-dtype")
        return BACKEND_PATH

    setattr(get_attn_backend_cls, _MARK, True)
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)  # type: ignore[method-assign]


def _size_on_026() -> None:
    """vLLM 0.26: apply our backend's ``customize_spec`` to the specs of layers that use it."""
    from vllm_gds_plugin.compat.version import check_supported_vllm

    if check_supported_vllm() != (0, 26):
        return
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec
    if getattr(original, _MARK, False):
        return

    def get_kv_cache_spec(self: Any, vllm_config: Any) -> Any:
        spec = original(self, vllm_config)
        if spec is not None and is_turboquant(self.kv_cache_dtype):
            return self.attn_backend.customize_spec(spec)
        return spec

    setattr(get_kv_cache_spec, _MARK, True)
    Attention.get_kv_cache_spec = get_kv_cache_spec  # type: ignore[method-assign]
