"""``vllm-gds capacity``: how many KV tokens fit per GPU, for every KV cache dtype side by side.

    vllm-gds capacity --model CONFIG_OR_HF_FOLDER --gpu-memory 80GiB|H100|H200|B200 --tensor-parallel-size N
        [--gpu-memory-utilization 0.9] [--kv-cache-dtype auto|fp8|turboquant[:PRESET]|turboquant_<native>]
        [--weights-dtype bf16|fp16|fp8] [--fp8-scheme per-tensor|block] [--max-model-len L]
        [--max-num-batched-tokens T] [--max-num-seqs S] [--non-kv-overhead SIZE] [--json]

The model and its constants are described in :mod:`vllm_gds_plugin.capacity` and docs/architecture.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from vllm_gds_plugin.capacity import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    GPU_MEMORY,
    NON_KV_FIXED_BYTES,
    GiB,
    Plan,
    PlanRequest,
    load_shape,
    plan,
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|[KMGT]i?B?)\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'80GiB' (binary), '141GB' (decimal), '81559MiB', a bare byte count, or a GPU name (H100, H200, B200)."""
    if text.upper() in GPU_MEMORY:
        return GPU_MEMORY[text.upper()]
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"not a memory size: {text!r} (e.g. 80GiB, 141GB, 81559MiB, or one of {', '.join(GPU_MEMORY)})")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit or unit in ("K", "M", "G", "T") else 1000
    power = " KMGT".index(unit[0]) if unit else 0
    return int(float(m.group(1)) * base**power)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``capacity`` on the ``vllm-gds`` parser."""
    p = sub.add_parser("capacity", help="plan weights and KV-cache tokens per GPU for every KV dtype",
                       description="Weights per GPU, KV bytes per token and KV-pool tokens for bf16, fp8, this "
                                   "plugin's TurboQuant presets and vLLM's native TurboQuant, side by side.")
    p.add_argument("--model", required=True, help="config.json or Hugging Face model folder")
    p.add_argument("--gpu-memory", required=True, type=parse_memory,
                   help=f"per-GPU total as CUDA reports it (nvidia-smi Total): a size, or one of "
                        f"{', '.join(GPU_MEMORY)}")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="the row to highlight: auto, fp8, turboquant[:PRESET] (e.g. turboquant:3bit), "
                        "or a vLLM native turboquant_* preset")
    p.add_argument("--weights-dtype", choices=("bf16", "fp16", "fp8"), help="default: the checkpoint's")
    p.add_argument("--fp8-scheme", choices=("per-tensor", "block"), default="per-tensor")
    p.add_argument("--max-model-len", type=int, help="default: the config's max_position_embeddings")
    p.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                   help=f"sizes the profiled activations (default {DEFAULT_MAX_NUM_BATCHED_TOKENS}, vLLM's LLM "
                        f"class on >= 70 GiB GPUs; `vllm serve` uses 8192)")
    p.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS)
    p.add_argument("--non-kv-overhead", type=parse_memory,
                   help="replace the modelled non-KV overhead (activations + CUDA graphs + non-torch) by a "
                        "measured one")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_capacity)


def selected_row_name(kv_cache_dtype: str) -> str:
    """The plan row a ``--kv-cache-dtype`` value refers to (``turboquant[:preset]`` -> ``turboquant:k<K>v<V>``)."""
    from vllm_gds_plugin.kvcache.presets import DEFAULT_PRESET, get_preset

    if kv_cache_dtype == DEFAULT_PRESET or kv_cache_dtype.startswith(DEFAULT_PRESET + ":"):
        p = get_preset(kv_cache_dtype.partition(":")[2] or DEFAULT_PRESET)
        return f"turboquant:k{p.key.avg_bits:g}v{p.value.avg_bits:g}"
    return kv_cache_dtype


def _capacity(args: argparse.Namespace) -> int:
    from vllm_gds_plugin.capacity import CapacityError
    from vllm_gds_plugin.kvcache.presets import TurboQuantConfigError

    try:
        shape = load_shape(args.model)
        result = plan(shape, PlanRequest(
            gpu_memory_bytes=args.gpu_memory, tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization, weights_dtype=args.weights_dtype,
            fp8_scheme=args.fp8_scheme, max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
            non_kv_overhead_bytes=args.non_kv_overhead))
        selected = result.row(selected_row_name(args.kv_cache_dtype)).option.name
    except (CapacityError, TurboQuantConfigError) as e:
        print(f"vllm-gds capacity: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict() | {"selected": selected}, indent=2))
    else:
        print(render(result, selected))
    return 0


def _g(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def render(p: Plan, selected: str) -> str:
    """The human report: header lines, then one table row per KV dtype (``*`` marks ``selected``)."""
    s, r, w, par = p.shape, p.request, p.weights, p.parallel
    replicas = f", each replicated {par.kv_replicas}x" if par.kv_replicas > 1 else ""
    fixed = ("measured (--non-kv-overhead)" if r.non_kv_overhead_bytes is not None else
             f"activations {_g(p.activation_bytes)} at {r.max_num_batched_tokens} batched tokens + "
             f"{_g(NON_KV_FIXED_BYTES)} fixed, calibrated on H100")
    lines = [
        f"model      {s.source}: {s.architecture}, {s.num_layers} layers, {s.num_heads} q / {s.num_kv_heads} KV "
        f"heads, head_dim {s.head_dim}",
        f"per GPU    {_g(r.gpu_memory_bytes)} x {r.gpu_memory_utilization:g} = "
        f"{_g(int(r.gpu_memory_bytes * r.gpu_memory_utilization))}; tensor parallel {par.tp}: {par.heads} q / "
        f"{par.kv_heads} KV heads per GPU{replicas}",
        f"weights    {_g(w.total)} per GPU ({w.dtype}): projections {_g(w.projections)}, embeddings + LM head "
        f"{_g(w.embeddings)}, norms/biases {_g(w.replicated)}, rotary cache {_g(w.rotary_cache)}"
        + (f", FP8 scales {w.scales / 2**20:.2f} MiB" if w.scales else ""),
        f"non-KV     {_g(p.overhead_bytes)} ({fixed})",
        f"KV pool    {_g(p.kv_pool_bytes)} per GPU; max_model_len {p.max_model_len}",
        "",
        f"  {'KV cache dtype':<24} {'bits':>5} {'B/token/GPU':>12} {'KV tokens':>12} {'x auto':>7} "
        f"{'seqs@max_len':>12}  select / note",
    ]
    for row in p.rows:
        o = row.option
        mark = "*" if o.name == selected else " "
        if row.tokens is None:
            lines.append(f"{mark} {o.name:<24} {o.bits:>5g} {'-':>12} {'-':>12} {'-':>7} {'-':>12}  {o.note}")
            continue
        seqs = f"{row.sequences_at_max_len:.1f}" if row.sequences_at_max_len is not None else "-"
        note = o.select + (f"  ({o.note})" if o.note else "")
        lines.append(f"{mark} {o.name:<24} {o.bits:>5g} {o.bytes_per_token:>12,} {row.tokens:>12,} "
                     f"{row.ratio_vs_auto:>7.2f} {seqs:>12}  {note}")
    return "\n".join(lines)
