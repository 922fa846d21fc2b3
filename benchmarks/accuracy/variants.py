"""What was tried: quantizer-level variants that vLLM's configuration does not expose, measured as perplexity.

    python -m benchmarks.accuracy.variants [--model smollm2] [--tokens 1000]

Uses the HF eager forward of benchmarks/tq_quality_proxy.py (every layer's post-RoPE K and V go through the torch
reference quantize -> dequantize before attention), which tracks the vLLM path closely (same quantizer, same
codebooks), and adds the knobs the plugin's engine configuration has no switch for: rotation per KV head instead
of per layer, boundary layers kept in bf16, K or V alone quantized (where the loss comes from), rotation seeds
(noise), and the per-(layer, KV head) K/V centering of ``vllm-gds calibrate`` (the engine applies it too). Writes benchmarks/results/accuracy_variants_<model>.json, rendered into docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.accuracy.run import MODELS, RESULTS, ROOT, resolve_model
from benchmarks.tq_quality_proxy import perplexity, roundtrip
from vllm_gds_plugin.kvcache.calibrate import ensure_calibration
from vllm_gds_plugin.kvcache.calibration import TurboQuantCalibration
from vllm_gds_plugin.kvcache.presets import TurboQuantPreset, get_preset
from vllm_gds_plugin.kvcache.quantizer import TurboQuantState

BOUNDARY = 2  # layers kept in bf16 at each end, as vLLM's native TurboQuant does


@dataclass(frozen=True)
class Variant:
    name: str
    knob: str
    preset: str
    per_head: bool = False
    boundary: int = 0  # first/last layers left unquantized
    quant_k: bool = True
    quant_v: bool = True
    seed: int = 0
    calibrated: bool = False  # per-(layer, KV head) centering/scale from vllm_gds_plugin.kvcache.calibrate
    exact_first: int = 0  # first tokens of the sequence kept unquantized (the attention sink)
    only_layer: int | None = None  # quantize this layer only (the others bf16)
    note: str = ""


VARIANTS = [
    Variant("turboquant (k4v3), per-layer rotation", "baseline", "turboquant"),
    Variant("turboquant, seed 1", "rotation seed (noise)", "turboquant", seed=1),
    Variant("turboquant, seed 2", "rotation seed (noise)", "turboquant", seed=2),
    Variant("turboquant, rotation per KV head", "rotation per head vs per layer", "turboquant", per_head=True),
    Variant(f"turboquant, first/last {BOUNDARY} layers bf16", "boundary layers", "turboquant", boundary=BOUNDARY),
    Variant("k3.5v3.5 (4/3-bit channel split in K and V)", "K/V bit mix at 3.5 bits", "3.5bit"),
    Variant("k3v4", "K/V bit mix at 3.5 bits", "k3v4"),
    Variant("4bit (k4v4)", "bits", "4bit"),
    Variant(f"4bit, first/last {BOUNDARY} layers bf16", "boundary layers", "4bit", boundary=BOUNDARY),
    Variant("K at 4 bits, V bf16", "which tensor loses (diagnostic)", "4bit", quant_v=False),
    Variant("V at 4 bits, K bf16", "which tensor loses (diagnostic)", "4bit", quant_k=False),
    Variant("V at 3 bits, K bf16", "which tensor loses (diagnostic)", "3bit", quant_k=False),
    Variant("turboquant + calibration", "K/V centering (calibration)", "turboquant", calibrated=True),
    Variant("4bit + calibration", "K/V centering (calibration)", "4bit", calibrated=True),
    Variant("3.5bit + calibration", "K/V centering (calibration)", "3.5bit", calibrated=True),
    Variant("3bit + calibration", "K/V centering (calibration)", "3bit", calibrated=True),
    *(Variant(f"{p} + calibration + first token bf16", "attention sink kept exact (not in the engine)", p,
              calibrated=True, exact_first=1) for p in ("4bit", "turboquant", "3.5bit", "3bit")),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help=f"{sorted(MODELS)} or an HF folder")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--only", nargs="*", type=int, default=None, help="indices into the variant list")
    args = ap.parse_args(argv)
    name, path, model, ids = proxy_model(args.model, args.tokens)
    chosen = [VARIANTS[i] for i in args.only] if args.only is not None else VARIANTS
    base, rows = measure_variants(path, model, ids, chosen)
    doc = {"kind": "accuracy_variants", "model": name, "tokens": int(ids.shape[1]), "bf16_ppl": base,
           "title": "quantizer-level variants (HF forward, torch reference quantizer)",
           "method": __doc__.strip().splitlines()[3].strip() + " " + " ".join(
               ln.strip() for ln in __doc__.strip().splitlines()[4:8]),
           "command": " ".join(["python -m benchmarks.accuracy.variants", *sys.argv[1:]]), "variants": rows}
    out = RESULTS / f"accuracy_variants_{name}.json"
    doc["variants"] = _merge(out, doc, rows)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def measure_variants(path: Path, model: Any, ids: torch.Tensor, chosen: list[Variant]
                     ) -> tuple[float, list[dict[str, Any]]]:
    """bf16-KV perplexity of ``ids``, and one row per variant (its perplexity through the quantizer roundtrip)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers: dict[int, tuple[TurboQuantState, Variant] | None] = {}

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *a: Any, **kw: Any):
        entry = layers[module.layer_idx]
        if entry is not None:
            st, v = entry
            n = v.exact_first  # positions [0, n) keep their bf16 K/V
            key = torch.cat([key[:, :, :n], roundtrip(key, st, True)[:, :, n:]], 2) if v.quant_k else key
            value = torch.cat([value[:, :, :n], roundtrip(value, st, False)[:, :, n:]], 2) if v.quant_v else value
        return sdpa_attention_forward(module, query, key, value, *a, **kw)

    AttentionInterface.register("tq_variants", attention)
    model.set_attn_implementation("sdpa")
    base = perplexity(model, ids)
    print(f"bf16 KV: ppl {base:.4f} over {ids.shape[1]} tokens", flush=True)
    model.set_attn_implementation("tq_variants")
    rows = []
    for v in chosen:
        t0 = time.time()
        preset: TurboQuantPreset = replace(get_preset(v.preset), per_head_rotation=v.per_head)
        for i in range(n_layers):
            edge = i < v.boundary or i >= n_layers - v.boundary or v.only_layer not in (None, i)
            cal = calibration(path).layer(i) if v.calibrated else None
            layers[i] = None if edge else (TurboQuantState.build(preset, head_dim, i, v.seed, calibration=cal,
                                                                 num_kv_heads=cfg.num_key_value_heads), v)
        ppl = perplexity(model, ids)
        bits = _avg_bits(preset, v, n_layers)
        rows.append({"variant": v.name, "knob": v.knob, "preset": v.preset, "avg_bits": bits, "ppl": ppl,
                     "ppl_delta_pct": 100 * (ppl / base - 1), "note": v.note})
        print(f"{v.name:>48}: ppl {ppl:.4f} ({100 * (ppl / base - 1):+.2f}%)  [{time.time() - t0:.0f}s]", flush=True)
    return base, rows


def proxy_model(model_arg: str, tokens: int) -> tuple[str, Path, Any, torch.Tensor]:
    """(name, folder, the HF model in bf16 eval mode, the first ``tokens`` token ids of the lee_background text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_gds_plugin.assets import lee_text

    name, path = resolve_model(model_arg)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return name, path, model, torch.tensor([tok.encode(lee_text())[:tokens]])


@functools.cache
def calibration(model_dir: Path) -> TurboQuantCalibration:
    """The calibration the engine would use for this folder (measured and saved first if it has none)."""
    return ensure_calibration(model_dir)


def _merge(path: Path, doc: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of an earlier ``--only`` run on the same model and text, updated with this run's, in list order."""
    old = json.loads(path.read_text()) if path.exists() else {}
    same = old.get("model") == doc["model"] and old.get("tokens") == doc["tokens"]
    by_name = {r["variant"]: r for r in (old.get("variants", []) if same else [])}
    by_name.update({r["variant"]: r for r in rows})
    order = {v.name: i for i, v in enumerate(VARIANTS)}
    return sorted(by_name.values(), key=lambda r: order.get(r["variant"], len(order)))


def _avg_bits(preset: TurboQuantPreset, v: Variant, n_layers: int) -> float:
    """Average stored bits per K/V element over all layers (bf16 layers and tensors count 16)."""
    k = preset.key.avg_bits if v.quant_k else 16.0
    val = preset.value.avg_bits if v.quant_v else 16.0
    q_layers = 1 if v.only_layer is not None else n_layers - 2 * v.boundary
    return (q_layers * (k + val) / 2 + (n_layers - q_layers) * 16.0) / n_layers


if __name__ == "__main__":
    raise SystemExit(main())
