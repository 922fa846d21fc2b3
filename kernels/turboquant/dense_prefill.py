"""Prefill over the compressed cache through a dense attention kernel (FlashAttention on the GPU).

Prefill is compute-bound: its cost is the query x key products, which a tuned FlashAttention does faster than
decoding codes inside the attention loop can. So for multi-token queries the cache range each sequence attends to
is dequantized (``triton_dequant``) into a bounded workspace and a varlen attention kernel runs over it with the
rotated queries; the usual finish step un-rotates. It attends to exactly what the Triton kernel attends to (the
chunk's own tokens too are read back from the cache), so outputs do not depend on chunking or prefix caching.

The workspace holds at most ``workspace_tokens`` positions (never a whole long prefix): each sequence's last
``workspace_tokens`` positions (which hold all of its queries' causal window ends) go through causal launches that
pack consecutive sequences; positions before that go through non-causal launches of one sequence each, whose
outputs are extra splits merged by log-sum-exp in the finish step. The plan is made once per batch on the host
(``plan``), from lengths vLLM keeps on the CPU, and reused by every layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from vllm_gds_plugin.kernels.turboquant import triton_attention, triton_dequant
from vllm_gds_plugin.kvcache.quantizer import TurboQuantState


class VarlenAttention(Protocol):
    """FlashAttention's varlen call: writes ``out [Tq, Hq, D]``; returns the natural-log LSE ``[Hq, Tq]`` when
    ``want_lse``. ``causal`` aligns each sequence's queries with the END of its keys."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, scale: float, causal: bool, out: torch.Tensor,
                 want_lse: bool) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class Launch:
    """One varlen call over consecutive sequences' query rows and their dequantized KV ranges."""

    causal: bool
    split: int  # partial-output slot (0: the causal part)
    rows: tuple[int, int]  # query rows of the prefill block
    cu_q: torch.Tensor  # int32 [n + 1], relative to rows[0]
    cu_k: torch.Tensor  # int32 [n + 1] workspace rows
    max_q: int
    max_k: int
    keys: int  # workspace rows it reads (cu_k[-1])
    tiles: torch.Tensor  # int32 [t, 4] (triton_dequant)


@dataclass(frozen=True)
class PrefillPlan:
    launches: tuple[Launch, ...]
    num_splits: int
    workspace_tokens: int  # rows the largest launch needs


def workspace_tokens_for(budget_bytes: int, num_kv_heads: int, head_dim: int, max_query_len: int) -> int:
    """Workspace positions that fit ``budget_bytes`` of 16-bit K and V, and at least one query chunk."""
    per_token = 2 * 2 * num_kv_heads * head_dim
    return max(budget_bytes // per_token, max_query_len, triton_dequant.TILE_TOKENS)


def _tiles(seq: int, start: int, end: int, row: int) -> list[list[int]]:
    step = triton_dequant.TILE_TOKENS
    return [[seq, p, row + p - start, min(step, end - p)] for p in range(start, end, step)]


def _launch(causal: bool, split: int, rows: tuple[int, int], pieces: list[tuple[int, int, int, int]],
            device: torch.device) -> Launch:
    """``pieces``: (sequence, query length, first position, end position) of consecutive sequences."""
    cu_q, cu_k, tiles = [0], [0], []
    for seq, q_len, start, end in pieces:
        tiles += _tiles(seq, start, end, cu_k[-1])
        cu_q.append(cu_q[-1] + q_len)
        cu_k.append(cu_k[-1] + end - start)
    as_int32 = {"dtype": torch.int32, "device": device}
    return Launch(causal, split, rows, torch.tensor(cu_q, **as_int32), torch.tensor(cu_k, **as_int32),
                  max(p[1] for p in pieces), max(p[3] - p[2] for p in pieces), cu_k[-1],
                  torch.tensor(tiles, **as_int32).reshape(-1, 4))


def plan(query_lens: Sequence[int], seq_lens: Sequence[int], workspace_tokens: int,
         device: torch.device) -> PrefillPlan:
    """The launches for sequences with these query and total lengths (queries are each sequence's last
    positions, their rows consecutive in sequence order)."""
    w = workspace_tokens
    assert max(query_lens) <= w, "every query chunk must fit the workspace"
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    launches: list[Launch] = []
    group: list[tuple[int, int, int, int]] = []
    group_tokens = 0
    for s, (q_len, length) in enumerate(zip(query_lens, seq_lens)):
        piece = (s, q_len, max(0, length - w), length)
        if group and group_tokens + piece[3] - piece[2] > w:
            launches.append(_launch(True, 0, (starts[group[0][0]], starts[s]), group, device))
            group, group_tokens = [], 0
        group.append(piece)
        group_tokens += piece[3] - piece[2]
        # Positions before the last w: whole windows, newest first, each an extra split.
        for split, end in enumerate(range(length - w, 0, -w), start=1):
            launches.append(_launch(False, split, (starts[s], starts[s + 1]),
                                    [(s, q_len, max(0, end - w), end)], device))
    launches.append(_launch(True, 0, (starts[group[0][0]], starts[len(query_lens)]), group, device))
    return PrefillPlan(tuple(launches), 1 + max(l.split for l in launches), max(l.keys for l in launches))


def attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, prefill: PrefillPlan,
              scale: float, state: TurboQuantState, varlen: VarlenAttention, out: torch.Tensor) -> torch.Tensor:
    """Causal attention of ``query [Tq, Hq, D]`` (the planned sequences' rows, ``block_table`` their rows) over
    the compressed cache into ``out``; same result as ``naive.attention`` up to rounding."""
    tq, hq, d = query.shape
    hkv = cache.shape[2]
    q_rot = triton_attention.rotate_query(query, state, hkv)
    splits = prefill.num_splits
    # Extra splits cover only long sequences: zeros (weight 0 via lse = -inf) elsewhere.
    part = (torch.empty if splits == 1 else torch.zeros)(splits, tq, hq, d, dtype=q_rot.dtype, device=query.device)
    lse = torch.full((splits, tq, hq), -math.inf, dtype=torch.float32, device=query.device)
    k_ws = torch.empty(prefill.workspace_tokens, hkv, d, dtype=q_rot.dtype, device=query.device)
    v_ws = torch.empty_like(k_ws)
    for launch in prefill.launches:
        r0, r1 = launch.rows
        triton_dequant.dequantize(cache, block_table, launch.tiles, state, k_ws, v_ws)
        # Only the rows this launch wrote: FlashAttention loads whole key tiles of the tensor it is given and
        # multiplies a masked key's zero probability by its value, so a stale NaN in a row past the last key
        # reached the output (H100, vLLM 0.26 FA3: tq_kernel_check-h100-20261206T0540Z).
        k, v = k_ws[:launch.keys], v_ws[:launch.keys]
        lse_e = varlen(q_rot[r0:r1], k, v, launch.cu_q, launch.cu_k, launch.max_q, launch.max_k, scale, launch.causal,
                       part[launch.split, r0:r1], splits > 1)
        if lse_e is not None:
            lse[launch.split, r0:r1] = lse_e.t() * math.log2(math.e)
    return triton_attention.finish(part, lse, state, hkv, out)
