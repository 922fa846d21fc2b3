"""TurboQuant Triton kernels vs their torch reference (naive.py).

On a CUDA machine the kernels run compiled on the GPU; elsewhere under TRITON_INTERPRET=1 on CPU tensors (small
shapes, few programs: the interpreter is slow per program). Same tests, same tolerances.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernel modules (triton.jit reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vllm_gds_plugin.kernels.turboquant import (  # noqa: E402
    dense_prefill,
    naive,
    ops,
    triton_attention,
    triton_dequant,
    triton_store,
)
from vllm_gds_plugin.kvcache.packing import unpack_codes  # noqa: E402
from vllm_gds_plugin.kvcache.presets import get_preset  # noqa: E402
from vllm_gds_plugin.kvcache.quantizer import TurboQuantState  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK_SIZE = 16


def make_cache(state: TurboQuantState, lens: list[int], num_kv_heads: int, seed: int, num_blocks: int = 24
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cache pre-filled with random bytes (stale data must never leak), a shuffled block table, and K/V
    stored for ``lens`` tokens per sequence through the reference. Returns cache, block_table, slots, k, v."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // BLOCK_SIZE) for n in lens) + 1
    cache = torch.randint(0, 256, (num_blocks, BLOCK_SIZE, num_kv_heads, state.slot_bytes), generator=g,
                          dtype=torch.uint8)
    block_table = torch.randperm(num_blocks, generator=g)[:len(lens) * max_blocks].view(len(lens), max_blocks)
    pos = [torch.arange(n) for n in lens]
    slots = torch.cat([block_table[s, p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for s, p in enumerate(pos)])
    t = sum(lens)
    k = torch.randn(t, num_kv_heads, state.head_dim, generator=g) * 2
    v = torch.randn(t, num_kv_heads, state.head_dim, generator=g)
    k[:, :, 3] += 8  # an outlier channel, as real keys have
    return (cache.to(DEVICE), block_table.int().to(DEVICE), slots.to(DEVICE), k.to(DEVICE), v.to(DEVICE))


# Both store paths rotate with a dense float32 product, summed in different orders (torch's CPU BLAS, numpy under
# the Triton interpreter, tensor cores on a GPU): a rotated coordinate within float32 rounding of a decision
# threshold may land on either side (seen on an AMD EPYC box, not on the Intel ones). Such a tie is the only
# difference allowed: adjacent codes, the coordinate (float64) within TIE of their threshold, and the slot's scale
# (a function of the codes) within SCALE_ULPS bf16 steps. Unit-variance units: |u| <= ~5, float32 error ~1e-6.
TIE = 1e-4
SCALE_ULPS = 2


def assert_same_store(out: torch.Tensor, ref: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      slots: torch.Tensor, state: TurboQuantState) -> None:
    """The kernel's cache ``out`` equals the reference's ``ref`` byte for byte, up to threshold ties."""
    block_size, d = out.shape[1], state.head_dim
    for b, s, h in (out != ref).any(-1).nonzero().tolist():
        written = (slots == b * block_size + s).nonzero()
        assert len(written), f"slot {b * block_size + s} was not written but differs"
        t = int(written[0, 0])
        a, r = out[b, s, h], ref[b, s, h]
        fields = torch.zeros_like(a, dtype=torch.bool)  # bytes of the K and V codes and scales
        for codec, x, prepare in ((state.key, key, state.prepare_key), (state.value, value, state.prepare_value)):
            code, norm = (slice(codec.code_offset, codec.code_offset + codec.code_bytes),
                          slice(codec.norm_offset, codec.norm_offset + 2))
            fields[code] = fields[norm] = True
            ca, cr = (unpack_codes(c[code].cpu(), codec.split, d) for c in (a, r))
            y = prepare(x[t:t + 1])[0, h].double() @ state.rot[h % state.rot.shape[0]].double().T
            u = y * d ** 0.5 / y.norm()
            for c in (ca != cr).nonzero()[:, 0].tolist():
                lo = min(int(ca[c]), int(cr[c]))
                where = f"slot {b * block_size + s} head {h} channel {c}: codes {int(ca[c])} vs {int(cr[c])}"
                assert abs(int(ca[c]) - int(cr[c])) == 1, where
                assert abs(u[c].item() - codec.boundaries[c, lo].item()) < TIE, f"{where}, u = {u[c].item()}"
            sa, sr = (int(c[norm].contiguous().view(torch.int16)) for c in (a, r))
            assert abs(sa - sr) <= (SCALE_ULPS if (ca != cr).any() else 0), (b, s, h, hex(sa), hex(sr))
        assert torch.equal(a[~fields], r[~fields]), f"slot {b * block_size + s} head {h}: bytes outside the fields"


@pytest.mark.parametrize("block_t", [1, 16], ids=["token_programs", "tiles"])
@pytest.mark.parametrize("preset,head_dim,heads", [("turboquant", 64, 3), ("4bit", 128, 2), ("3bit", 256, 1),
                                                   ("k2.5v3.5", 128, 1)])
def test_store_bit_exact(preset: str, head_dim: int, heads: int, block_t: int) -> None:
    state = TurboQuantState.build(get_preset(preset), head_dim, 2, device=DEVICE)
    cache, _, slots, k, v = make_cache(state, [29, 7], heads, seed=head_dim)
    slots[5] = -1
    ref = cache.clone()
    naive.store(k, v, ref, slots, state)
    triton_store.store(k, v, cache, slots, state, block_t=block_t)
    assert_same_store(cache, ref, k, v, slots, state)


class AttentionCase:
    """Random K/V stored through the reference for sequences of ``lens`` tokens, queries for their last
    ``qlens`` positions, and the reference's attention output."""

    def __init__(self, head_dim: int, hkv: int, ratio: int, qlens: list[int], lens: list[int],
                 dtype: torch.dtype) -> None:
        self.state = TurboQuantState.build(get_preset("turboquant"), head_dim, 1, device=DEVICE)
        self.cache, self.block_table, slots, k, v = make_cache(self.state, lens, hkv, seed=ratio + head_dim,
                                                               num_blocks=max(32, len(lens) * (max(lens) // 16 + 2)))
        naive.store(k, v, self.cache, slots, self.state)
        self.qsl = torch.tensor([0, *qlens]).cumsum(0).int().to(DEVICE)
        g = torch.Generator().manual_seed(5)
        self.q = torch.randn(int(self.qsl[-1]), hkv * ratio, head_dim, generator=g).to(DEVICE).to(dtype)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        self.scale = head_dim ** -0.5
        self.ref = naive.attention(self.q, self.cache, self.block_table, self.seq_lens, self.qsl, self.scale,
                                   self.state).float()

    def check(self, out: torch.Tensor) -> None:
        """Relative error of ``out``: float32 rounding, or 16-bit rounding where the dots run in 16 bits."""
        q = self.q
        tol = 1e-4 if q.dtype == torch.float32 or not q.is_cuda and q.dtype == torch.bfloat16 else 2e-2
        rel = ((out.float() - self.ref).norm() / self.ref.norm()).item()
        assert rel < tol, rel


CASES = [
    # head_dim, kv heads, GQA ratio, query lens per seq, seq lens, splits, dtype
    (64, 3, 3, [1, 1, 1], [37, 5, 16], 1, torch.bfloat16),  # SmolLM2 shape, decode, ragged
    (128, 2, 4, [1, 1], [50, 33], 2, torch.float16),  # decode, split-KV + reduction
    (128, 1, 8, [4, 1], [40, 9], 3, torch.bfloat16),  # spec-decode-like + decode, odd split count
    (256, 1, 8, [6], [21], None, torch.float32),  # head_dim 256, chunked-prefill continuation
    (64, 2, 1, [20, 1], [20, 70], 2, torch.float16),  # MHA, full prefill + long decode
    (64, 1, 16, [1, 1], [30, 3], None, torch.float16),  # MQA-like group of 16, decode (rows = heads)
    (64, 1, 16, [5, 2], [12, 40], 2, torch.bfloat16),  # group of 16 with multi-token queries (4 per block)
    (64, 2, 2, [1030, 1], [1030, 40], 2, torch.bfloat16),  # a long chunk: query/finish take 32 tokens a program
]


# The default launch shape, and 16-token tiles loaded one step ahead, all words or scales + K only (several steps
# per program, the last step's prefetch past the end of its split).
TILES = {"default": None, "n16-prefetch": triton_attention.Tile(16, 4, 1, 64, prefetch=2),
         "n16-prefetch-k": triton_attention.Tile(16, 4, 1, 64, prefetch=1)}


# The 16-token tiles skip the long chunk: it checks the query and finish kernels' 32 tokens a program, which do not
# depend on the tile, and its ~130 tile steps a program cost the interpreter 80-100 s per tile shape.
TILE_CASES = [(*case, tile) for tile in TILES for case in CASES if tile == "default" or case[3][0] < 1000]


@pytest.mark.parametrize("head_dim,hkv,ratio,qlens,lens,splits,dtype,tile", TILE_CASES)
def test_attention_matches_reference(head_dim: int, hkv: int, ratio: int, qlens: list[int], lens: list[int],
                                     splits: int | None, dtype: torch.dtype, tile: str) -> None:
    case = AttentionCase(head_dim, hkv, ratio, qlens, lens, dtype)
    out = torch.full_like(case.q, float("nan"))
    triton_attention.attention(case.q, case.cache, case.block_table, case.seq_lens, case.qsl, case.scale,
                               case.state, out=out, num_splits=splits, tile=TILES[tile])
    case.check(out)


def test_decode_merges_its_splits_in_the_last_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode launch with KV splits merges them in the program of each (sequence, KV head) that ends last instead
    of a finish launch: the finish kernel's output bit for bit, and its counters back at zero afterwards (a CUDA
    graph replays the launch as captured)."""
    case = AttentionCase(128, 2, 4, [1, 1, 1], [50, 33, 70], torch.bfloat16)
    outs = {}
    for fused in ("1", "0", "1"):
        monkeypatch.setenv(triton_attention.FUSED_FINISH_ENV, fused)
        out = torch.full_like(case.q, float("nan"))
        triton_attention.attention(case.q, case.cache, case.block_table, case.seq_lens, case.qsl, case.scale,
                                   case.state, out=out, num_splits=3)
        assert fused not in outs or torch.equal(out, outs[fused]), "a second launch differs from the first"
        outs[fused] = out
    assert torch.equal(outs["1"], outs["0"])
    case.check(outs["1"])
    assert not triton_attention.split_locks(case.q.device, 3 * 2)[:6].any()


if torch.cuda.is_available():
    def test_decode_merges_its_splits_inside_a_cuda_graph() -> None:
        """A capture that is the first decode launch on its stream (torch.cuda.graph's own capture stream) still
        merges in place (its counter words are allocated and zeroed inside the capture), and every replay gives
        the eager launch's output bit for bit."""
        case = AttentionCase(128, 2, 4, [1, 1, 1], [50, 33, 70], torch.bfloat16)
        eager = torch.empty_like(case.q)
        triton_attention.attention(case.q, case.cache, case.block_table, case.seq_lens, case.qsl, case.scale,
                                   case.state, out=eager, num_splits=3)
        out = torch.full_like(case.q, float("nan"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            capture_stream = torch.cuda.current_stream().cuda_stream
            triton_attention.attention(case.q, case.cache, case.block_table, case.seq_lens, case.qsl, case.scale,
                                       case.state, out=out, num_splits=3)
        assert (case.q.device, capture_stream) in triton_attention._split_locks, "the capture got the finish kernel"
        for _ in range(2):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager)


@pytest.mark.parametrize("preset,head_dim,dtype", [("turboquant", 64, torch.float32), ("3bit", 128, torch.float16),
                                                   ("k2.5v3.5", 256, torch.float32)])
def test_dequantize_matches_reference(preset: str, head_dim: int, dtype: torch.dtype) -> None:
    state = TurboQuantState.build(get_preset(preset), head_dim, 2, device=DEVICE)
    lens = [150, 9]
    cache, block_table, slots, k, v = make_cache(state, lens, 2, seed=head_dim)
    k[3] = float("nan")  # a non-finite input stores NaN (quantizer.py), which dequantizes to NaN
    v[152] = float("inf")  # a NaN value: a NaN key and a zero value in the dense form
    naive.store(k, v, cache, slots, state)
    # (sequence, first position, end): a tile past a block edge, a partial tile, a whole sequence
    ranges = [(0, 5, 150), (1, 0, 9), (0, 0, 64)]
    tiles, row0 = [], 0
    for s, a, b in ranges:  # the ranges one after another in the workspace
        tiles += dense_prefill._tiles(s, a, b, row0)
        row0 += b - a
    k_ws = torch.full((row0, 2, head_dim), 7.0, dtype=dtype, device=DEVICE)
    v_ws = torch.full_like(k_ws, 7.0)
    triton_dequant.dequantize(cache, block_table, torch.tensor(tiles, dtype=torch.int32, device=DEVICE), state,
                              k_ws, v_ws)
    assert k_ws[150 - 5 + 2].isnan().all() and (v_ws[150 - 5 + 2] == 0).all()  # sequence 1, position 2
    row0 = 0
    for s, a, b in ranges:
        k_ref, v_ref = naive.read_for_attention(cache, block_table[s], b, state)
        rows = slice(row0, row0 + b - a)
        torch.testing.assert_close(k_ws[rows], k_ref[a:b].to(dtype), equal_nan=True)
        torch.testing.assert_close(v_ws[rows], v_ref[a:b].to(dtype), equal_nan=True)
        row0 += b - a


def test_dense_prefill_plan_bounds_the_workspace() -> None:
    """Sequences pack into causal launches of at most W positions; positions before a sequence's last W go
    through non-causal launches that are extra splits."""
    p = dense_prefill.plan([3, 2, 4, 1], [3, 10, 40, 5], 16, torch.device("cpu"))
    summary = [(la.causal, la.split, la.rows, la.cu_k.tolist()) for la in p.launches]
    assert summary == [(True, 0, (0, 5), [0, 3, 13]),  # sequences 0 and 1; + 16 would not fit
                       (False, 1, (5, 9), [0, 16]),  # sequence 2: positions 8-23
                       (False, 2, (5, 9), [0, 8]),  # 0-7
                       (True, 0, (5, 9), [0, 16]),  # its last 16 (24-39); + sequence 3 would not fit
                       (True, 0, (9, 10), [0, 5])]
    assert p.num_splits == 3 and p.workspace_tokens == 16
    assert p.launches[3].tiles.tolist() == [[2, 24, 0, 16]]


@pytest.mark.parametrize("batch,context,splits", [(1, 32768, 32), (1, 131072, 32), (8, 4096, 4), (8, 32768, 16),
                                                  (32, 4096, 4)])
def test_split_count_picks_the_measured_best(batch: int, context: int, splits: int) -> None:
    """Decode on an H100 (132 SMs, 3 programs per SM at 160 registers), 8 KV heads: the split counts that were
    fastest (bs8 @ 32K: within 0.5% of 32 splits) among those measured on 2026-12-07
    (benchmarks/results/experiments/attention_splits_probe-*); prefill-sized launches (thousands of programs) stay
    unsplit; an uncapped tile keeps the old rule's largest count."""
    assert triton_attention.split_count(8 * batch, context, 128, 132, 3) == splits
    assert triton_attention.split_count(4096, 32768, 128, 132, 3) == 1
    assert triton_attention.split_count(8, 32768, 128, 132, None) == 64  # no register cap: the largest


PREFILL_CASES = [
    # head_dim, kv heads, GQA ratio, query lens, seq lens, workspace positions, dtype
    (64, 3, 3, [20, 5], [20, 70], 64, torch.float32),  # full prefill + continuation, one launch
    (128, 2, 4, [16, 3, 9], [40, 3, 100], 48, torch.float16),  # packing, a 3-split sequence
    (128, 1, 8, [7], [7], 7, torch.bfloat16),  # workspace = one chunk exactly
    (256, 1, 4, [2, 30], [66, 30], 40, torch.float16),
    (64, 1, 4, [1030, 5], [1100, 40], 1040, torch.float16),  # a long chunk (16 tokens a query/finish program)
]
# The torch reference of the FlashAttention call everywhere; on a GPU also vLLM's FlashAttention where installed
# (16-bit inputs only).
VARLEN_CASES = [(*case, "reference") for case in PREFILL_CASES]
if torch.cuda.is_available():
    from vllm_gds_plugin.compat.flash_attention import varlen_flash_attention

    VARLEN_CASES += [(*case, "flash") for case in PREFILL_CASES
                     if case[-1] != torch.float32 and varlen_flash_attention("cuda", case[0]) is not None]


@pytest.mark.parametrize("head_dim,hkv,ratio,qlens,lens,workspace,dtype,varlen", VARLEN_CASES)
def test_dense_prefill_matches_reference(head_dim: int, hkv: int, ratio: int, qlens: list[int], lens: list[int],
                                         workspace: int, dtype: torch.dtype, varlen: str) -> None:
    case = AttentionCase(head_dim, hkv, ratio, qlens, lens, dtype)
    prefill = dense_prefill.plan(qlens, lens, workspace, DEVICE)
    fn = naive.varlen_attention if varlen == "reference" else varlen_flash_attention("cuda", head_dim)
    out = torch.full_like(case.q, float("nan"))
    dense_prefill.attention(case.q, case.cache, case.block_table, prefill, case.scale, case.state, fn, out)
    case.check(out)


@pytest.mark.parametrize("varlen", sorted({case[-1] for case in VARLEN_CASES}))
def test_dense_prefill_nan_reaches_exactly_the_queries_that_see_it(varlen: str) -> None:
    """As naive.attention: a NaN value (sequence 0, position 7) or key (sequence 1, position 6) makes exactly the
    outputs of the queries at and after it NaN; the chunk's earlier queries stay finite and unchanged."""
    state = TurboQuantState.build(get_preset("turboquant"), 128, 0, device=DEVICE)
    cache, block_table, slots, k, v = make_cache(state, [12, 10], 2, seed=4)
    v[7] = float("inf")
    k[12 + 6] = float("nan")
    naive.store(k, v, cache, slots, state)
    qlens, lens = [8, 7], [12, 10]
    q = torch.randn(15, 4, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE).to(torch.float16)
    qsl = torch.tensor([0, 8, 15], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = naive.attention(q, cache, block_table, seq_lens, qsl, 0.1, state).float()
    fn = naive.varlen_attention if varlen == "reference" else varlen_flash_attention("cuda", 128)
    out = torch.empty_like(q)
    dense_prefill.attention(q, cache, block_table, dense_prefill.plan(qlens, lens, 16, DEVICE), 0.1, state, fn, out)
    rows_nan = torch.tensor([False] * 3 + [True] * 5 + [False] * 3 + [True] * 4, device=DEVICE)
    assert torch.equal(ref.isnan().all(-1).all(-1), rows_nan) and torch.equal(out.isnan().any(-1).any(-1), rows_nan)
    torch.testing.assert_close(out[~rows_nan].float(), ref[~rows_nan], rtol=2e-2, atol=2e-2)


def test_reference_is_close_to_exact_attention() -> None:
    """The quantized reference itself stays close to unquantized attention (guards the math, not the kernels)."""
    state = TurboQuantState.build(get_preset("4bit"), 128, 0, device=DEVICE)
    cache, block_table, slots, k, v = make_cache(state, [64], 2, seed=3)
    naive.store(k, v, cache, slots, state)
    q = torch.randn(1, 4, 128, generator=torch.Generator().manual_seed(9)).to(DEVICE) * 0.3
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    out = naive.attention(q, cache, block_table, torch.tensor([64], dtype=torch.int32, device=DEVICE), qsl,
                          128 ** -0.5, state)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    probs = torch.softmax(torch.einsum("qhd,khd->hqk", q, kk) * 128 ** -0.5, -1)
    exact = torch.einsum("hqk,khd->qhd", probs, vv)
    assert ((out - exact).norm() / exact.norm()).item() < 0.12


def test_special_vectors_defined_behaviour() -> None:
    """Zero -> exact zero; fp16-range huge -> finite, normal relative error; NaN/Inf -> NaN for whoever sees it."""
    state = TurboQuantState.build(get_preset("turboquant"), 64, 0, device=DEVICE)
    cache, block_table, slots, k, v = make_cache(state, [8, 8], 1, seed=4)
    k[0] = 0.0
    v[0] = 0.0
    k[1] = 65504.0
    v[1] = -65504.0
    k[8] = float("nan")
    v[9] = float("inf")
    ref = cache.clone()
    naive.store(k, v, ref, slots, state)
    triton_store.store(k, v, cache, slots, state)
    assert_same_store(cache, ref, k, v, slots, state)
    k_hat, v_hat = naive.read_rotated(cache, block_table[0], 8, state)
    assert torch.equal(k_hat[0], torch.zeros_like(k_hat[0])) and torch.equal(v_hat[0], torch.zeros_like(v_hat[0]))
    huge = state.rotate(k[1:2]).squeeze(0)
    assert torch.isfinite(k_hat[1]).all() and ((k_hat[1] - huge).norm() / huge.norm()).item() < 0.2
    q = torch.full((2, 1, 64), 0.01, device=DEVICE)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([8, 8], dtype=torch.int32, device=DEVICE)
    out = triton_attention.attention(q, cache, block_table, seq_lens, qsl, 0.125, state)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


def test_ops_dispatch_runs_reference_on_cpu_and_triton_on_cuda() -> None:
    state = TurboQuantState.build(get_preset("3bit"), 64, 0, device=DEVICE)
    cache, block_table, slots, k, v = make_cache(state, [12], 1, seed=6)
    ref = cache.clone()
    ops.store(k, v, cache, slots, state)
    naive.store(k, v, ref, slots, state)
    if DEVICE.type == "cuda":
        assert_same_store(cache, ref, k, v, slots, state)  # the kernel, up to threshold ties
    else:
        assert torch.equal(cache, ref)  # the reference both times
    q = torch.randn(1, 2, 64, device=DEVICE)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([12], dtype=torch.int32, device=DEVICE)
    out = ops.attention(q, cache, block_table, seq_lens, qsl, 0.125, state)
    assert ops.use_triton(q) == q.is_cuda
    assert torch.allclose(out, naive.attention(q, cache, block_table, seq_lens, qsl, 0.125, state), atol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_calibration_is_exact_for_attention(impl: str) -> None:
    """Storing k + mu_k with key_mean mu_k (and v * s_v + mu_v with value calibration) gives the same attention,
    up to the known output shift, as storing k and v uncalibrated: centering changes no logit difference."""
    from vllm_gds_plugin.kvcache.calibration import LayerCalibration

    hkv, d = 2, 64
    plain = TurboQuantState.build(get_preset("turboquant"), d, 3, device=DEVICE, num_kv_heads=hkv)
    g = torch.Generator().manual_seed(8)
    mu_k, mu_v = torch.randn(hkv, d, generator=g) * 5, torch.randn(hkv, d, generator=g)
    s_k, s_v = torch.rand(hkv, d, generator=g) + 0.5, torch.rand(hkv, d, generator=g) + 0.5
    cal = LayerCalibration(mu_k, s_k, mu_v, s_v)
    calibrated = TurboQuantState.build(get_preset("turboquant"), d, 3, device=DEVICE, num_kv_heads=hkv,
                                       calibration=cal)
    cache, block_table, slots, k, v = make_cache(plain, [21, 6], hkv, seed=12)
    cache2 = cache.clone()
    c = calibrated.calibration
    store = naive.store if impl == "reference" else triton_store.store
    attend = naive.attention if impl == "reference" else triton_attention.attention
    store(k, v, cache, slots, plain)
    store(k * c.key_scale + c.key_mean, v * c.value_scale + c.value_mean, cache2, slots, calibrated)
    q = torch.randn(2, 6, d, generator=g).to(DEVICE)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([21, 6], dtype=torch.int32, device=DEVICE)
    # Attention with q over the calibrated cache == attention with q * s_k over the plain one, then v's affine map.
    want = attend(calibrated.prepare_query(q), cache, block_table, seq_lens, qsl, 0.125, plain)
    want = want * c.value_scale.repeat_interleave(3, 0) + c.value_mean.repeat_interleave(3, 0)
    got = attend(q, cache2, block_table, seq_lens, qsl, 0.125, calibrated)
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), (got - want).abs().max()
