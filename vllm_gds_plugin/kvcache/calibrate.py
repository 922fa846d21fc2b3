"""Measure a model's TurboQuant calibration (calibration.py) on real text with its Hugging Face implementation.

Runs the bf16 model over windows of the text with an attention hook that sees every layer's post-RoPE keys and
averages them per (layer, KV head). Each window starts a fresh sequence, so the attention-sink token of several
different first tokens is represented. Offline and once per model: ~10 s for
SmolLM2-135M on 2 CPU cores with the default 4096 tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_gds_plugin.kvcache.calibration import CALIBRATION_FILE, TurboQuantCalibration, find_calibration

DEFAULT_TOKENS = 4096
DEFAULT_WINDOW = 512
# lee_background is also the evaluation text of the accuracy tests, which read its first few thousand tokens:
# calibrate on a part far from them, so no evaluation text is ever seen by calibration.
LEE_OFFSET_TOKENS = 40_000


class KeyMeans:
    """Running sums of post-RoPE keys per (layer, KV head)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        self.sum = torch.zeros(num_layers, num_kv_heads, head_dim, dtype=torch.float64)
        self.count = torch.zeros(num_layers, dtype=torch.float64)

    def add(self, layer: int, k: torch.Tensor) -> None:
        """Keys of one sequence, ``[Hkv, T, D]``."""
        self.sum[layer] += k.double().sum(1).cpu()
        self.count[layer] += k.shape[1]

    def result(self, tokens: int, source: str) -> TurboQuantCalibration:
        """Key centers; values and channel scales stay identity (both measured worse: docs/turboquant.md)."""
        mean = (self.sum / self.count.clamp_min(1).view(-1, 1, 1)).float()
        ones = torch.ones_like(mean)
        return TurboQuantCalibration(mean, ones, torch.zeros_like(mean), ones.clone(), tokens=tokens, source=source)


def calibrate(model_dir: str | Path, token_ids: list[int], window: int = DEFAULT_WINDOW, source: str = "",
              progress: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
              ) -> TurboQuantCalibration:
    """Run the model (bf16, HF eager forward) over ``token_ids`` in windows of ``window`` tokens."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(device).eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    means = KeyMeans(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)

    def hook(module, query, key, value, attention_mask, **kw):  # [1, H, T, D] each
        means.add(module.layer_idx, key[0])
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("vllm_gds_tq_calibrate", hook)
    model.set_attn_implementation("vllm_gds_tq_calibrate")
    windows = [token_ids[i:i + window] for i in range(0, len(token_ids) - window + 1, window)]
    if not windows:
        raise ValueError(f"calibration needs at least {window} tokens, got {len(token_ids)}")
    with torch.no_grad():
        for i, w in enumerate(windows):
            model(torch.tensor([w], device=device))
            progress(f"calibrate: window {i + 1}/{len(windows)} ({window} tokens)")
    return means.result(len(windows) * window, source)


def ensure_calibration(model_dir: str | Path,
                       progress: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
                       ) -> TurboQuantCalibration:
    """``model_dir``'s calibration; measured with the defaults and saved next to the weights if it has none."""
    found = find_calibration(model_dir)
    if found is not None:
        return found
    progress(f"calibrate: measuring TurboQuant key centering for {model_dir} (once per model)")
    ids, source = default_token_ids(model_dir, DEFAULT_TOKENS)
    cal = calibrate(model_dir, ids, source=source, progress=progress)
    cal.save(Path(model_dir) / CALIBRATION_FILE)
    return cal


def default_token_ids(model_dir: str | Path, tokens: int) -> tuple[list[int], str]:
    """``tokens`` tokens of real English news text (lee_background), far from the part the tests evaluate on."""
    from transformers import AutoTokenizer

    from vllm_gds_plugin.assets import lee_text

    ids = AutoTokenizer.from_pretrained(str(model_dir))(lee_text()).input_ids
    start = min(LEE_OFFSET_TOKENS, max(0, len(ids) - tokens))
    return ids[start:start + tokens], f"lee_background tokens {start}..{start + tokens}"


def text_token_ids(model_dir: str | Path, text_file: Path, tokens: int) -> tuple[list[int], str]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_dir))(text_file.read_text(encoding="utf-8")).input_ids
    return ids[:tokens], f"{text_file.name} first {min(tokens, len(ids))} tokens"

