"""Which parameters each source tensor writes into, learned from vLLM itself before any byte is loaded.

The sharder must know when a parameter is final (so its bytes can go to disk and its memory be reused) and when
it is first written (so it can be given memory just then). Both follow from vLLM's ``load_weights``, which is
per-architecture logic the sharder must not copy (merged qkv / gate_up, tied embeddings, skipped tensors,
pipeline stages). So the rank's model is built once more on the ``meta`` device (no memory) and every source
tensor is fed alone, as a zero-stride CPU tensor of the right shape and dtype (no memory either); the names
``load_weights`` reports are that tensor's targets. A model whose ``load_weights`` reports nothing, or that
cannot be built or loaded on the meta device, has no plan (a warning says so): the sharder then keeps each rank
whole in memory until its loading ends, as vLLM's own loader does, and the output is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TouchPlan:
    first: dict[str, int]  # parameter -> index of the first source tensor that writes into it
    last: dict[str, int]  # parameter -> index of the last one

    @classmethod
    def learn(cls, model_dir: Path, spec, dtype: str,
              feed: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> TouchPlan | None:
        """The plan of rank ``spec`` (a compat.model_build.RankSpec) for source tensors ``feed`` (in order)."""
        from vllm_gds_plugin.compat.model_build import load_rank_weights, rank_model

        first: dict[str, int] = {}
        last: dict[str, int] = {}
        try:
            with rank_model(model_dir, spec, dtype, device="meta") as (model, _):
                for i, (name, shape, dt) in enumerate(feed):
                    touched = load_rank_weights(model, [(name, torch.zeros((), dtype=dt).expand(shape))])
                    if touched is None:
                        log.warning("%s.load_weights reports no parameter names: each rank is held in memory "
                                    "until it is loaded completely", type(model).__name__)
                        return None
                    for p in touched:
                        first.setdefault(p, i)
                        last[p] = i
        except Exception as e:  # a layer that cannot be built or loaded on meta: correct output, more memory
            log.warning("touch plan unavailable (vLLM on the meta device: %s: %.300s); each rank is held in "
                        "memory until it is loaded completely", type(e).__name__, e)
            return None
        return cls(first, last)

    def by_batch(self, batch_of: list[int]) -> tuple[list[list[str]], list[list[str]]]:
        """(parameters first written by batch b, parameters final after batch b) for each batch b, where
        ``batch_of[i]`` is the batch of source tensor i."""
        n = max(batch_of, default=-1) + 1
        starts: list[list[str]] = [[] for _ in range(n)]
        ends: list[list[str]] = [[] for _ in range(n)]
        for p, i in self.first.items():
            starts[batch_of[i]].append(p)
        for p, i in self.last.items():
            ends[batch_of[i]].append(p)
        return starts, ends
