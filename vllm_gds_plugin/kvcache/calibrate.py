"""Measure a model's TurboQuant calibration (calibration.py) on real text with its Hugging Face implementation.

Runs the bf16 model over windows of the text with an attention hook that sees every layer's post-RoPE q, k, v and
accumulates attention-weighted K and V means per (layer, KV head). Each window starts a fresh sequence, so the
attention-sink token of several different first tokens is represented. Offline and once per model: ~10 s for
SmolLM2-135M on 2 CPU cores with the default 4096 tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_gds_plugin.kvcache.calibration import TurboQuantCalibration

DEFAULT_TOKENS = 4096
DEFAULT_WINDOW = 512
# lee_background is also the evaluation text of the accuracy tests, which read its first few thousand tokens:
# calibrate on a part far from them, so no evaluation text is ever seen by calibration.
LEE_OFFSET_TOKENS = 40_000


class AttentionMeans:
    """Running sums of ``sum_i p_ti x_i`` over queries t for K and V, per (layer, KV head)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        shape = (num_layers, num_kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=torch.float64)
        self.value = torch.zeros(shape, dtype=torch.float64)
        self.queries = torch.zeros(num_layers, dtype=torch.float64)

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        """Causal attention of one sequence: ``q [Hq, T, D]``, ``k, v [Hkv, T, D]``."""
        hkv, t, d = k.shape
        g = q.shape[0] // hkv
        logits = torch.einsum("hgtd,hsd->hgts", q.float().view(hkv, g, t, d), k.float()) * scale
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        mass = torch.softmax(logits, dim=-1).sum((1, 2)).double() / g  # [Hkv, S]: attention each key receives
        self.key[layer] += torch.einsum("hs,hsd->hd", mass, k.double()).cpu()
        self.value[layer] += torch.einsum("hs,hsd->hd", mass, v.double()).cpu()
        self.queries[layer] += t

    def result(self, tokens: int, source: str) -> TurboQuantCalibration:
        n = self.queries.clamp_min(1).view(-1, 1, 1)
        ones = torch.ones_like(self.key, dtype=torch.float32)
        return TurboQuantCalibration((self.key / n).float(), ones, (self.value / n).float(), ones.clone(),
                                     tokens=tokens, source=source)


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
    means = AttentionMeans(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)

    def hook(module, query, key, value, attention_mask, **kw):  # [1, H, T, D] each
        means.add(module.layer_idx, query[0], key[0], value[0], kw.get("scaling") or head_dim ** -0.5)
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

