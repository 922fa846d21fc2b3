"""Quality proxy for choosing TurboQuant presets: HF eager forward with K/V passed through quantize->dequantize.

Not the vLLM path (benchmarks/accuracy does that); this isolates the quantizer: every layer's post-RoPE K and V go
through the torch reference (rotate, quantize, bf16 scale, dequantize, un-rotate) before attention, and we report
perplexity on lee_background vs unquantized. Usage:
    python benchmarks/tq_quality_proxy.py [--model smollm2-135m-instruct] [--tokens 2048] [--presets k4v4 ...]
        [--calibration auto|none|PATH]
``auto`` (default) uses MODEL_DIR/turboquant_calibration.tqcal, measuring it first (``vllm-gds calibrate``
defaults: lee_background far from the evaluated tokens) when the folder has none; both variants are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from vllm_gds_plugin.kvcache import rotation
from vllm_gds_plugin.kvcache.calibrate import ensure_calibration
from vllm_gds_plugin.kvcache.calibration import TurboQuantCalibration
from vllm_gds_plugin.kvcache.presets import get_preset
from vllm_gds_plugin.kvcache.quantizer import TurboQuantState

DEFAULT_PRESETS = ["4bit", "k4v3.5", "k4v3", "3.5bit", "k3v4", "3bit"]


def roundtrip(x: torch.Tensor, state: TurboQuantState, key: bool) -> torch.Tensor:
    """x [B, H, T, D] -> dequantized, same dtype, calibration undone (equivalent for attention: quantizer.py)."""
    codec, cal = (state.key if key else state.value), state.calibration
    mean, chan = (cal.key_mean, cal.key_scale) if key else (cal.value_mean, cal.value_scale)
    prepared = state.prepare_key(x.transpose(1, 2)) if key else state.prepare_value(x.transpose(1, 2))
    codes, scale = codec.quantize(rotation.rotate(prepared, state.signs))
    scale = scale.to(torch.bfloat16).float()
    y = rotation.unrotate(codec.dequantize(codes, scale), state.signs) * chan + mean
    return y.transpose(1, 2).to(x.dtype)


def load_calibration(how: str, model_path: Path) -> TurboQuantCalibration | None:
    if how == "none":
        return None
    if how != "auto":
        return TurboQuantCalibration.load(Path(how))
    return ensure_calibration(model_path)


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(nll.item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--presets", nargs="*", default=DEFAULT_PRESETS)
    ap.add_argument("--per-head", action="store_true", help="also measure per-KV-head rotation")
    ap.add_argument("--calibration", default="auto", help="auto | none | path of a calibration file")
    ap.add_argument("--no-uncalibrated", action="store_true", help="skip the uncalibrated variants")
    args = ap.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vllm_gds_plugin.assets import lee_text, model_dir

    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = tok(lee_text(), return_tensors="pt").input_ids[:, :args.tokens]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    current: dict[int, TurboQuantState] = {}

    def tq_attention(module, query, key, value, attention_mask, **kw):
        st = current[module.layer_idx]
        return sdpa_attention_forward(module, query, roundtrip(key, st, True), roundtrip(value, st, False),
                                      attention_mask, **kw)

    AttentionInterface.register("tq_proxy", tq_attention)
    model.set_attn_implementation("sdpa")
    base = perplexity(model, ids)
    results = {"model": args.model, "tokens": int(ids.shape[1]), "bf16": base, "presets": {}}
    print(f"bf16 KV: ppl {base:.4f}", flush=True)
    model.set_attn_implementation("tq_proxy")
    cal = load_calibration(args.calibration, path)
    if cal is not None:
        results["calibration"] = {"tokens": cal.tokens, "source": cal.source}
    presets = [(n, get_preset(n)) for n in args.presets]
    if args.per_head:
        presets += [(n + "+perhead", replace(get_preset(n), per_head_rotation=True)) for n in args.presets]
    variants = [] if cal is not None and args.no_uncalibrated else [(n, p, None) for n, p in presets]
    variants += [] if cal is None else [(n + "+cal", p, cal) for n, p in presets]
    for name, preset, c in variants:
        t0 = time.time()
        current.clear()
        for i in range(cfg.num_hidden_layers):
            current[i] = TurboQuantState.build(preset, head_dim, i, 0, num_kv_heads=cfg.num_key_value_heads,
                                               calibration=None if c is None else c.layer(i))
        ppl = perplexity(model, ids)
        results["presets"][name] = {"ppl": ppl, "delta_pct": 100 * (ppl / base - 1), "avg_bits": preset.avg_bits,
                                    "slot_bytes": preset.slot_bytes(head_dim)}
        print(f"{name:>16}: ppl {ppl:.4f} ({100 * (ppl / base - 1):+.2f}%)  [{time.time() - t0:.0f}s]", flush=True)
    out = Path(__file__).parent / "results" / f"tq_quality_proxy_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
