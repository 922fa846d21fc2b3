"""KV-cache capacity planner: weights per GPU, KV bytes per token, and KV-pool tokens for every KV dtype.

Pure arithmetic on a Hugging Face ``config.json`` (no vLLM, no torch, no GPU), following what vLLM 0.26 does:

- **Weights per GPU** (tensor parallel size ``tp``): q/k/v and gate/up are merged column-parallel layers split
  by ``tp``; o/down are row-parallel (input split); embeddings and the LM head are vocab-parallel over the
  vocabulary padded to a multiple of 64 (vLLM's ``DEFAULT_VOCAB_PADDING_SIZE``); norms are replicated; a tied
  LM head costs nothing; with ``tp`` > KV heads each rank holds one KV head (vLLM replicates KV heads
  ``tp / kv_heads`` times). FP8 weights are 1 byte per projection element plus fp32 scales (one per logical
  shard for per-tensor, one per 128x128 block for block scaling); embeddings, LM head and norms stay 16-bit.
  The rotary cos/sin cache (``max_position_embeddings x head_dim`` in the model dtype) is counted too.
- **KV pool**: vLLM gives the KV cache ``gpu_memory_utilization x total - weights - non-KV overhead`` and cuts it
  into blocks of 16 tokens whose page holds every layer (``UniformTypeKVCacheSpecs``: per-layer pages summed).
  The pool's token count is per GPU and equal on all ranks (each rank holds its KV heads for every token).
- **Non-KV overhead** (profiled activations, CUDA graphs, non-torch memory such as cuBLAS workspaces):
  ``overhead = max(forward, sampler) + NON_KV_FIXED_BYTES`` where
  ``forward = max_num_batched_tokens x (2 x hidden + 3 x intermediate / tp) x 2 bytes`` (residual + normed
  hidden states + the gate_up output + its activation, the largest tensors alive in vLLM's profile run) and
  ``sampler = max_num_seqs x vocab x 4 bytes x 2`` (fp32 logits and probabilities of the dummy sampler run).
  ``NON_KV_FIXED_BYTES`` is calibrated from the H100 measurement of issue 6 (:data:`H100_CALIBRATION`):
  Llama-3.1-8B, CUDA total 81559 MiB, utilization 0.9, vLLM's LLM-class defaults on a >= 70 GiB GPU
  (``max_num_batched_tokens`` 16384, ``max_num_seqs`` 1024), bf16 KV = 444,528 tokens.
  ``tests/test_capacity.py`` re-derives the constant from that measurement and checks that fp8 and vLLM's native
  turboquant_4bit_nc / turboquant_3bit_nc (measured on the same run) are predicted within 3%. Not modelled:
  NCCL / custom all-reduce buffers at ``tp`` > 1 (a few hundred MiB) and ``--enforce-eager`` (no CUDA graphs):
  pass ``non_kv_overhead_bytes`` when you have measured your own.

KV dtypes compared: vLLM's ``auto`` (the model dtype) and ``fp8``; every TurboQuant preset of this plugin
(:mod:`vllm_gds_plugin.kvcache.presets`, bytes per slot from ``slot_bytes``); vLLM's native TurboQuant presets,
sized as in vLLM 0.26 ``vllm/model_executor/layers/quantization/turboquant/config.py`` (``TQ_PRESETS``,
``TurboQuantConfig.key_packed_size`` / ``value_packed_size`` / ``slot_size_aligned``) with the first and last
2 layers kept in the model dtype (``get_boundary_skip_layers``, applied by ``vllm/engine/arg_utils.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_gds_plugin.kvcache.presets import (
    DEFAULT_PRESET,
    SUPPORTED_HEAD_DIMS,
    TurboQuantPreset,
    get_preset,
    preset_names,
)

MiB = 2**20
GiB = 2**30

VOCAB_PADDING = 64  # vLLM DEFAULT_VOCAB_PADDING_SIZE (vocab_parallel_embedding.py)
BLOCK_SIZE = 16  # vLLM's default KV block size on CUDA
FP8_BLOCK = (128, 128)
# vLLM's defaults for the LLM class on GPUs with >= 70 GiB (EngineArgs.get_batch_defaults); `vllm serve` uses
# 8192 batched tokens.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 16384
DEFAULT_MAX_NUM_SEQS = 1024

# CUDA-reported total memory (what nvidia-smi prints as Total and vLLM multiplies by the utilization), which is a
# little less than the marketing size. Public nvidia-smi outputs: H100 80GB HBM3 81559 MiB (modal-labs/modal-client
# PR #2797), H200 143771 MiB (nvidia-smi on H200 SXM), B200 183359 MiB (NVIDIA/TensorRT-LLM issue #10278).
GPU_MEMORY = {"H100": 81559 * MiB, "H200": 143771 * MiB, "B200": 183359 * MiB}

# Native TurboQuant presets of vLLM 0.26 (TQ_PRESETS): (key bits, value bits); 8 key bits = FP8 keys.
NATIVE_TQ_PRESETS = {
    "turboquant_k8v4": (8, 4),
    "turboquant_4bit_nc": (4, 4),
    "turboquant_k3v4_nc": (3, 4),
    "turboquant_3bit_nc": (3, 3),
}
NATIVE_TQ_BOUNDARY_LAYERS = 2  # first and last N layers stay in the model dtype

# Issue 6, measured with vLLM 0.26.0 on one H100 80GB HBM3: Llama-3.1-8B, gpu_memory_utilization 0.9,
# max_model_len 131072, CUDA graphs on. KV-pool tokens reported by vLLM ("GPU KV cache size").
H100_CALIBRATION = {
    "gpu_memory_bytes": GPU_MEMORY["H100"],
    "gpu_memory_utilization": 0.9,
    "tensor_parallel_size": 1,
    "model": "Llama-3.1-8B",
    "kv_tokens": {"auto": 444_528, "fp8": 889_056, "turboquant_4bit_nc": 1_256_832, "turboquant_3bit_nc": 1_485_152},
}
# Calibrated so that the plan for H100_CALIBRATION reproduces its bf16 token count (see the module docstring).
NON_KV_FIXED_BYTES = int(887.5 * MiB)

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "bf16"}  # vLLM serves fp32 configs in bf16


class CapacityError(ValueError):
    """A model config the planner cannot size, or inconsistent planning inputs."""


@dataclass(frozen=True)
class Architecture:
    """Which optional tensors a decoder family has."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)


def _llama(cfg: Mapping[str, Any]) -> Architecture:
    bias = bool(cfg.get("attention_bias", False))
    return Architecture(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))


ARCHITECTURES = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "Qwen2ForCausalLM": lambda cfg: Architecture(qkv_bias=True),
    "Qwen3ForCausalLM": lambda cfg: Architecture(qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=True),
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters that size weights and KV cache (from a Llama/Mistral/Qwen2/Qwen3 ``config.json``)."""

    source: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str  # "bf16" | "fp16" | "fp8": how the checkpoint's projections are stored
    sliding_window: int | None
    arch: Architecture

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], source: str) -> ModelShape:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise CapacityError(f"{source}: architecture {archs or 'missing'} is not supported by the planner "
                                f"(supported: {', '.join(ARCHITECTURES)})")
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise CapacityError(f"{source}: {arch} config lacks {', '.join(missing)}")
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        quant = (cfg.get("quantization_config") or {}).get("quant_method")
        dtype = "fp8" if quant == "fp8" else _CONFIG_DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype"), "bf16")
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(source=source, architecture=arch, hidden_size=int(cfg["hidden_size"]),
                   intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
                   vocab_size=int(cfg["vocab_size"]),
                   max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), dtype=dtype,
                   sliding_window=int(window) if window else None, arch=ARCHITECTURES[arch](cfg))


def load_shape(path: str | Path) -> ModelShape:
    """``ModelShape`` of a ``config.json`` or of an HF model folder containing one."""
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CapacityError(f"{cfg_path}: no such file (give a config.json or a Hugging Face model folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CapacityError(f"{cfg_path}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise CapacityError(f"{cfg_path}: not a JSON object")
    return ModelShape.from_config(cfg, str(cfg_path))


@dataclass(frozen=True)
class Parallel:
    """How one rank's share of the attention and MLP follows from ``tp`` (vLLM's rules)."""

    tp: int
    heads: int
    kv_heads: int
    kv_replicas: int
    intermediate: int

    @classmethod
    def of(cls, shape: ModelShape, tp: int) -> Parallel:
        if tp < 1:
            raise CapacityError(f"--tensor-parallel-size must be >= 1, got {tp}")
        problems = [f"{name} ({n}) is not divisible by --tensor-parallel-size {tp}"
                    for name, n in (("num_attention_heads", shape.num_heads),
                                    ("intermediate_size", shape.intermediate_size)) if n % tp]
        kv = shape.num_kv_heads
        if kv >= tp and kv % tp:
            problems.append(f"num_key_value_heads ({kv}) is not divisible by --tensor-parallel-size {tp}")
        if kv < tp and tp % kv:
            problems.append(f"--tensor-parallel-size {tp} is larger than num_key_value_heads ({kv}) but not a "
                            f"multiple of it: vLLM replicates each KV head tp / kv_heads times, which must be an "
                            f"integer")
        if problems:
            raise CapacityError(f"{shape.source}: " + "; ".join(problems))
        return cls(tp=tp, heads=shape.num_heads // tp, kv_heads=max(1, kv // tp), kv_replicas=max(1, tp // kv),
                   intermediate=shape.intermediate_size // tp)


@dataclass(frozen=True)
class Weights:
    """Bytes of one rank's weights in GPU memory, by kind."""

    dtype: str
    projections: int  # q/k/v/o/gate/up/down weights
    scales: int  # FP8 weight scales
    embeddings: int  # input embedding + LM head (vocab-parallel, padded)
    replicated: int  # norms and biases
    rotary_cache: int

    @property
    def total(self) -> int:
        return self.projections + self.scales + self.embeddings + self.replicated + self.rotary_cache


def weights_per_gpu(shape: ModelShape, par: Parallel, dtype: str, fp8_scheme: str = "per-tensor") -> Weights:
    if dtype not in _DTYPE_BYTES:
        raise CapacityError(f"weights dtype {dtype!r}: choose one of {', '.join(_DTYPE_BYTES)}")
    h, d = shape.hidden_size, shape.head_dim
    q, kv = par.heads * d, par.kv_heads * d
    # (output rows, input columns) of each logical weight one rank holds, per layer.
    mats = [(q, h), (kv, h), (kv, h), (h, q), (par.intermediate, h), (par.intermediate, h), (h, par.intermediate)]
    projections = shape.num_layers * sum(n * k for n, k in mats)
    if dtype == "fp8":
        per_mat = ([1] * len(mats) if fp8_scheme == "per-tensor"
                   else [math.ceil(n / FP8_BLOCK[0]) * math.ceil(k / FP8_BLOCK[1]) for n, k in mats])
        scales = shape.num_layers * sum(per_mat) * 4
    else:
        scales = 0
    a = shape.arch
    per_layer = (2 * h + (q + 2 * kv) * a.qkv_bias + h * a.o_bias + (2 * par.intermediate + h) * a.mlp_bias
                 + 2 * d * a.qk_norm)
    half = 2  # embeddings, LM head, norms and biases stay in the 16-bit model dtype, also for FP8 weights
    vocab_rows = math.ceil(shape.vocab_size / VOCAB_PADDING) * VOCAB_PADDING // par.tp
    return Weights(dtype=dtype, projections=projections * _DTYPE_BYTES[dtype], scales=scales,
                   embeddings=vocab_rows * h * (1 if shape.tie_word_embeddings else 2) * half,
                   replicated=(shape.num_layers * per_layer + h) * half,
                   rotary_cache=shape.max_position_embeddings * d * half)


@dataclass(frozen=True)
class KVOption:
    """One KV cache dtype: how to select it and what a token costs on one GPU (all layers)."""

    name: str
    family: str  # "vllm" | "plugin" | "vllm-native"
    select: str  # the vLLM flags that pick it
    bits: float  # average bits per K/V element (before norms/scales)
    bytes_per_token: int | None  # None: unsupported for this model
    note: str = ""


def _plugin_presets() -> list[tuple[str, list[str]]]:
    """Every ``k<K>v<V>`` preset the plugin defines, with the aliases (``turboquant``, ``3bit``, ...) naming it."""
    names = preset_names()
    aliases: dict[str, list[str]] = {}
    for alias in (n for n in names if not n.startswith("k")):
        p = get_preset(alias)
        aliases.setdefault(f"k{p.key.avg_bits:g}v{p.value.avg_bits:g}", []).append(alias)
    return [(n, aliases.get(n, [])) for n in names if n.startswith("k")]


def kv_options(shape: ModelShape, par: Parallel) -> list[KVOption]:
    """Every KV dtype side by side: vLLM's auto and fp8, the plugin's presets, vLLM's native TurboQuant."""
    layers, heads, d = shape.num_layers, par.kv_heads, shape.head_dim
    model_bytes = 2  # bf16/fp16 KV for "auto" (an FP8 checkpoint still computes in 16 bits)
    dense = layers * heads * 2 * d * model_bytes
    out = [KVOption("auto", "vllm", "--kv-cache-dtype auto", 16, dense, "model dtype"),
           KVOption("fp8", "vllm", "--kv-cache-dtype fp8", 8, dense // 2, "fp8_e4m3, per-tensor scales")]
    plugin_refusal = _plugin_refusal(shape)
    for name, aliases in _plugin_presets():
        preset: TurboQuantPreset = get_preset(name)
        select = "--kv-cache-dtype turboquant" + ("" if DEFAULT_PRESET in aliases else f" + VLLM_GDS_TQ_PRESET={name}")
        size = None if plugin_refusal else layers * heads * preset.slot_bytes(d)
        note = plugin_refusal or ("= " + ", ".join(aliases) if aliases else "")
        out.append(KVOption(f"turboquant:{name}", "plugin", select, preset.avg_bits, size, note))
    for name, (kb, vb) in NATIVE_TQ_PRESETS.items():
        boundary = min(NATIVE_TQ_BOUNDARY_LAYERS, layers // 2)
        skip = len(set(range(boundary)) | set(range(layers - boundary, layers)))
        size = (layers - skip) * heads * native_tq_slot_bytes(kb, vb, d) + skip * heads * 2 * d * model_bytes
        out.append(KVOption(name, "vllm-native", f"--kv-cache-dtype {name}", (kb + vb) / 2, size,
                            f"{skip} boundary layers in model dtype"))
    return out


def _plugin_refusal(shape: ModelShape) -> str:
    if shape.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"unsupported: head_dim {shape.head_dim} (plugin supports {SUPPORTED_HEAD_DIMS})"
    if shape.sliding_window and shape.sliding_window < shape.max_position_embeddings:
        return "unsupported: sliding-window attention"
    return ""


def native_tq_slot_bytes(key_bits: int, value_bits: int, head_dim: int) -> int:
    """vLLM 0.26 ``TurboQuantConfig.slot_size_aligned``: packed K (+fp16 norm, or FP8 keys) + V (+fp16 scale, zero)."""
    key = head_dim if key_bits == 8 else math.ceil(head_dim * key_bits / 8) + 2
    value = math.ceil(head_dim * value_bits / 8) + 4
    slot = key + value
    return slot + slot % 2


@dataclass(frozen=True)
class PlanRequest:
    gpu_memory_bytes: int
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    weights_dtype: str | None = None  # None: the checkpoint's
    fp8_scheme: str = "per-tensor"
    max_model_len: int | None = None  # None: the config's max_position_embeddings
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    non_kv_overhead_bytes: int | None = None  # None: the calibrated model


@dataclass(frozen=True)
class KVRow:
    option: KVOption
    tokens: int | None
    ratio_vs_auto: float | None
    sequences_at_max_len: float | None


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    request: PlanRequest
    parallel: Parallel
    weights: Weights
    activation_bytes: int
    overhead_bytes: int
    kv_pool_bytes: int
    max_model_len: int
    rows: list[KVRow] = field(default_factory=list)

    def row(self, name: str) -> KVRow:
        for r in self.rows:
            if r.option.name == name:
                return r
        raise CapacityError(f"no KV dtype {name!r}; known: {', '.join(r.option.name for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``vllm-gds capacity --json`` (schema in docs/architecture.md#capacity)."""
        s = self.shape
        return {
            "model": {"source": s.source, "architecture": s.architecture, "num_layers": s.num_layers,
                      "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                      "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
                      "vocab_size": s.vocab_size, "tie_word_embeddings": s.tie_word_embeddings,
                      "checkpoint_dtype": s.dtype},
            "request": asdict(self.request),
            "per_gpu": {"kv_heads": self.parallel.kv_heads, "kv_head_replicas": self.parallel.kv_replicas,
                        "attention_heads": self.parallel.heads},
            "weights_bytes": asdict(self.weights) | {"total": self.weights.total},
            "budget_bytes": int(self.request.gpu_memory_bytes * self.request.gpu_memory_utilization),
            "activation_bytes": self.activation_bytes,
            "overhead_bytes": self.overhead_bytes,
            "kv_pool_bytes": self.kv_pool_bytes,
            "max_model_len": self.max_model_len,
            "kv_cache": [asdict(r.option) | {"tokens": r.tokens, "ratio_vs_auto": r.ratio_vs_auto,
                                             "sequences_at_max_model_len": r.sequences_at_max_len}
                         for r in self.rows],
        }


def activation_bytes(shape: ModelShape, par: Parallel, req: PlanRequest) -> int:
    """Peak of vLLM's profile run: the dummy forward or the dummy sampler, whichever is larger (see docstring)."""
    forward = req.max_num_batched_tokens * (2 * shape.hidden_size + 3 * par.intermediate) * 2
    sampler = req.max_num_seqs * shape.vocab_size * 4 * 2
    return max(forward, sampler)


def plan(shape: ModelShape, req: PlanRequest) -> Plan:
    if not 0 < req.gpu_memory_utilization <= 1:
        raise CapacityError(f"--gpu-memory-utilization must be in (0, 1], got {req.gpu_memory_utilization}")
    par = Parallel.of(shape, req.tensor_parallel_size)
    weights = weights_per_gpu(shape, par, req.weights_dtype or shape.dtype, req.fp8_scheme)
    act = activation_bytes(shape, par, req)
    overhead = act + NON_KV_FIXED_BYTES if req.non_kv_overhead_bytes is None else req.non_kv_overhead_bytes
    budget = int(req.gpu_memory_bytes * req.gpu_memory_utilization)
    pool = budget - weights.total - overhead
    if pool <= 0:
        raise CapacityError(
            f"{shape.source}: no memory left for the KV cache: {_gib(budget)} GiB usable per GPU "
            f"({req.gpu_memory_utilization:g} x {_gib(req.gpu_memory_bytes)} GiB) - {_gib(weights.total)} GiB "
            f"weights - {_gib(overhead)} GiB non-KV overhead; raise --tensor-parallel-size or use FP8 weights")
    max_len = req.max_model_len or shape.max_position_embeddings
    rows, auto = [], None
    for opt in kv_options(shape, par):
        tokens = None if opt.bytes_per_token is None else pool // (opt.bytes_per_token * BLOCK_SIZE) * BLOCK_SIZE
        auto = tokens if opt.name == "auto" else auto
        rows.append(KVRow(opt, tokens, None if tokens is None else tokens / auto,
                          None if tokens is None or not max_len else tokens / max_len))
    return Plan(shape, req, par, weights, act, overhead, pool, max_len, rows)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"
