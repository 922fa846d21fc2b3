"""Perplexity, greedy top-1 agreement and KL divergence from vLLM ``prompt_logprobs`` (pure functions, no vLLM).

vLLM returns, per prompt position, the top-``k`` log-probabilities plus the log-probability of the actual next
token. That is all we keep (``TopK``), so the KL divergence is computed on coarse-grained distributions:

    KL_k(P || Q) = sum_{t in top-k of P} p_t log(p_t / q_t) + p_tail log(p_tail / q_tail)

where P is the bf16-KV reference, Q the compressed-KV run, and each tail lumps every token outside P's top-k
(``p_tail = 1 - sum p_t``, ``q_tail = 1 - sum q_t`` over the same tokens). Lumping tokens together can only lower
a KL divergence (data-processing inequality), so KL_k is a lower bound of the full-vocabulary KL up to one more
approximation: a token of P's top-k that is missing from Q's top-k gets Q's k-th probability, an upper bound of
its true probability. With k = 20 the reference's top-20 holds most of the mass at almost every position (the
mean tail mass is reported next to the KL so the reader can judge).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TAIL_FLOOR = 1e-12  # a tail probability can round to <= 0 when the top-k holds all the mass


@dataclass(frozen=True)
class TopK:
    """Per predicted position i (predicting token i+1 of the prompt): top-k ids/logprobs, rank order."""

    target_logprob: np.ndarray  # float64 [N-1]: log p(actual next token)
    ids: np.ndarray  # int64 [N-1, k]
    logprobs: np.ndarray  # float64 [N-1, k]


def topk_from_prompt_logprobs(prompt_logprobs: Sequence[Mapping[int, Any] | None], token_ids: Sequence[int],
                              k: int) -> TopK:
    """``RequestOutput.prompt_logprobs`` (position 0 is None; values have ``.logprob`` and ``.rank``) -> TopK."""
    if len(prompt_logprobs) != len(token_ids):
        raise ValueError(f"prompt_logprobs has {len(prompt_logprobs)} positions for {len(token_ids)} prompt tokens")
    n = len(token_ids) - 1
    target = np.empty(n)
    ids = np.empty((n, k), dtype=np.int64)
    lps = np.empty((n, k))
    for i in range(n):
        entry = prompt_logprobs[i + 1]
        if entry is None:
            raise ValueError(f"prompt position {i + 1} has no logprobs")
        target[i] = entry[token_ids[i + 1]].logprob
        ranked = sorted(((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank is not None
                         and lp.rank <= k))
        if len(ranked) < k:
            raise ValueError(f"prompt position {i + 1}: {len(ranked)} logprobs of rank <= {k}; "
                             f"start the engine with max_logprobs >= {k}")
        ids[i] = [t for _, t, _ in ranked]
        lps[i] = [lp for _, _, lp in ranked]
    return TopK(target, ids, lps)


def perplexity(t: TopK) -> float:
    return math.exp(-float(t.target_logprob.mean()))


def top1_agreement(ref: TopK, test: TopK) -> float:
    """Fraction of positions where both runs' greedy next token is the same."""
    _check_same(ref, test)
    return float((ref.ids[:, 0] == test.ids[:, 0]).mean())


def kl_divergence(ref: TopK, test: TopK) -> tuple[float, float]:
    """(mean KL_k(ref || test) in nats, mean reference tail mass); see the module docstring."""
    _check_same(ref, test)
    p = np.exp(ref.logprobs)  # [N, k]
    q_min = test.logprobs[:, -1:]
    # log q for each of ref's top-k tokens: its logprob in test's top-k, else test's k-th logprob.
    match = ref.ids[:, :, None] == test.ids[:, None, :]  # [N, k_ref, k_test]
    found = match.any(-1)
    log_q = np.where(found, (match * test.logprobs[:, None, :]).sum(-1), q_min)
    q = np.exp(log_q)
    p_tail = np.maximum(1.0 - p.sum(-1), TAIL_FLOOR)
    q_tail = np.maximum(1.0 - q.sum(-1), TAIL_FLOOR)
    kl = (p * (ref.logprobs - log_q)).sum(-1) + p_tail * np.log(p_tail / q_tail)
    return float(kl.mean()), float(p_tail.mean())


def _check_same(ref: TopK, test: TopK) -> None:
    if ref.ids.shape != test.ids.shape:
        raise ValueError(f"runs cover different positions/k: {ref.ids.shape} vs {test.ids.shape}")
