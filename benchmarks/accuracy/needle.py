"""Needle in a haystack on real text: one fact planted at a given depth of lee_background news, exact-match answer.

The format is a plain completion (no chat template) that even SmolLM2-135M answers at short context in bf16: the
needle is a one-line statement between two news articles, and the prompt ends with the statement's own prefix, so
the answer is the number the model copies next. Each (context, depth) gets its own seeded random number so that a
model cannot pass by repeating one answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SUBJECT = "The secret code for the vault"
QUESTION = f"\n\nQuestion: What is the secret code for the vault?\nAnswer: {SUBJECT} is"
ANSWER_TOKENS = 8  # greedy tokens generated for the answer; a 5-digit number needs at most ~6


@dataclass(frozen=True)
class NeedleCase:
    context: int  # requested prompt length in tokens (the actual length is len(prompt_ids))
    depth: float  # where the needle sits, as a fraction of the filler (0 = first line, 1 = last)
    answer: str
    prompt_ids: list[int]


def build_cases(encode: Callable[[str], list[int]], text: str, contexts: Sequence[int], depths: Sequence[float],
                seed: int = 0) -> list[NeedleCase]:
    """One case per (context, depth); ``encode`` is the model tokenizer's text -> ids."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line_tokens = [len(encode(ln)) + 1 for ln in lines]  # + the newline joining it
    rng = random.Random(seed)
    cases = []
    for ctx in contexts:
        for depth in depths:
            answer = str(rng.randrange(10_000, 100_000))
            needle = f"{SUBJECT} is {answer}."
            budget = ctx - len(encode(needle)) - len(encode(QUESTION)) - 2
            chosen, used = [], 0
            for ln, n in zip(lines, line_tokens):
                if used + n > budget:
                    break
                chosen.append(ln)
                used += n
            if not chosen:
                raise ValueError(f"context {ctx} leaves no room for filler text")
            # Insert between articles, at the line boundary closest to the requested depth (by tokens).
            cum = [0]
            for n in line_tokens[:len(chosen)]:
                cum.append(cum[-1] + n)
            at = min(range(len(cum)), key=lambda i: abs(cum[i] - depth * used))
            body = "\n".join(chosen[:at] + [needle] + chosen[at:])
            cases.append(NeedleCase(ctx, depth, answer, encode(body + QUESTION)))
    return cases


def is_correct(case: NeedleCase, generated: str) -> bool:
    """Exact match: the first number the model writes is the planted one."""
    m = re.search(r"\d+", generated)
    return m is not None and m.group(0) == case.answer
