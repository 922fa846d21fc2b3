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


@cache
def loader_class() -> type:
    """The loader class, built on first use so importing this module does not import vLLM."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from vllm_gds_plugin.loading.loader import LoadOptions, load_rank, model_destinations, validate
    from vllm_gds_plugin.loading.manifest import Manifest

    class GdsShardedModelLoader(BaseModelLoader):
        """``--load-format gds-sharded``: see :mod:`vllm_gds_plugin.loading.loader`."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.options = LoadOptions.from_extra_config(load_config.model_loader_extra_config)

        @staticmethod
        def _checked_manifest(vllm_config: Any, model_config: Any) -> Manifest:
            manifest = Manifest.load(model_config.model)
            validate(manifest, running_config(vllm_config, model_config))
            return manifest

        def download_model(self, model_config: Any) -> None:
            Manifest.load(model_config.model)  # nothing to download: the folder must be complete

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
            # Refuse a mismatching checkpoint before spending time (and memory) building the model.
            self._checked_manifest(vllm_config, model_config)
            return super().load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)

        def load_weights(self, model: Any, model_config: Any) -> None:
            manifest = self._checked_manifest(get_current_vllm_config(), model_config)
            dest, required = model_destinations(model)
            pp, tp = current_rank()
            load_rank(manifest, pp, tp, dest, self.options, required)

    return GdsShardedModelLoader
