"""Kernel-level decode attention benchmark: TurboQuant (ours) vs FlashAttention bf16 vs vLLM's native TurboQuant.

Llama-3.1-8B attention shapes (32 query / 8 KV heads, head_dim 128), block size 16, batch 1/8/32 x context
4K/32K/128K. Reports time per call, achieved bandwidth on the bytes each kernel must read (compressed bytes for
ours), and % of the HBM peak measured in the same run by a large device-to-device copy. Needs a CUDA GPU.

    python benchmarks/bench_tq_attention.py            # the table (< 6 min on an H100)
    python benchmarks/bench_tq_attention.py --check    # correctness: the tq tests, compiled on this GPU
    python benchmarks/bench_tq_attention.py --sweep    # launch-shape sweep of our kernel (picks default_tile)
    python benchmarks/bench_tq_attention.py --prefill  # one chunked-prefill step: FA bf16 vs our two paths
    python benchmarks/bench_tq_attention.py --kernels ours_turboquant --splits 3 4 6  # forced KV split counts
Results: benchmarks/results/bench_tq_attention_<time>.json (and $OUT/ if set).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py, also under python -P
from machine import out_copies, smi  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 16
BATCHES = (1, 8, 32)
CONTEXTS = (4096, 32768, 131072)
OUR_PRESETS = ("3bit", "turboquant", "4bit")
NATIVE_PRESETS = ("turboquant_4bit_nc", "turboquant_3bit_nc")


def bench_ms(fn) -> float:
    import triton.testing

    try:  # CUDA graphs remove launch overhead for every contender alike
        return float(triton.testing.do_bench_cudagraph(fn, rep=60))
    except Exception:  # noqa: BLE001 - fall back to plain events (e.g. a kernel that syncs)
        return float(triton.testing.do_bench(fn, rep=60))


def hbm_peak_gbs() -> float:
    """HBM peak: the best of a 4 GiB device-to-device copy (read + write bytes) and a read-only reduction of the
    same 4 GiB (a decode kernel only reads, and reads alone run faster than a copy's mixed traffic)."""
    n = 4 << 30
    src = torch.zeros(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * n / bench_ms(lambda: dst.copy_(src)) / 1e6
    del dst
    words = src.view(torch.float32)
    read = n / bench_ms(lambda: words.sum()) / 1e6
    del src, words
    torch.cuda.empty_cache()
    print(f"HBM: D2D copy {copy:.0f} GB/s, read-only sum {read:.0f} GB/s", flush=True)
    return max(copy, read)


def block_table(batch: int, ctx: int) -> torch.Tensor:
    per = ctx // BLOCK
    return torch.arange(batch * per, dtype=torch.int32, device="cuda").view(batch, per)


def random_cache(preset: str, batch: int, ctx: int):
    """(state, cache) with random codes and sane scales for ``batch`` sequences of ``ctx`` tokens."""
    from vllm_gds_plugin.kvcache.presets import get_preset
    from vllm_gds_plugin.kvcache.quantizer import TurboQuantState

    state = TurboQuantState.build(get_preset(preset), D, 0, device="cuda")
    cache = torch.randint(0, 256, (batch * ctx // BLOCK, BLOCK, HKV, state.slot_bytes), dtype=torch.uint8,
                          device="cuda")
    one = torch.tensor([1.0], dtype=torch.bfloat16).view(torch.uint8).cuda()  # sane scales, random codes
    for codec in (state.key, state.value):
        cache[..., codec.norm_offset:codec.norm_offset + 2] = one
    return state, cache


def bench_ours(preset: str, batch: int, ctx: int, tile=None, num_splits: int | None = None, q_len: int = 1) -> dict:
    """Our attention for ``batch`` sequences of ``ctx`` tokens whose last ``q_len`` are the queries (1 = decode;
    more = a chunked-prefill step)."""
    from vllm_gds_plugin.kernels.turboquant import triton_attention

    state, cache = random_cache(preset, batch, ctx)
    q = torch.randn(batch * q_len, HQ, D, dtype=torch.bfloat16, device="cuda")
    bt = block_table(batch, ctx)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * q_len
    out = torch.empty_like(q)
    ms = bench_ms(lambda: triton_attention.attention(q, cache, bt, seq_lens, qsl, D ** -0.5, state, out,
                                                     num_splits=num_splits, tile=tile))
    return {"ms": ms, "bytes": batch * ctx * HKV * state.slot_bytes}


# (batch, context, query tokens per sequence): decode points (bs1 @ 32K: the one shape where the kernel trailed FA3
# on 2026-12-07), then a 2048-token chunked-prefill step at 32K
SWEEP_SHAPES = ((32, 4096, 1), (8, 32768, 1), (1, 32768, 1), (1, 131072, 1), (1, 32768, 2048))
# (block_n, warps, stages, block_m, prefetch: 0 none / 1 scales + K / 2 all[, register cap]): a compile costs
# seconds, so a short list around the expected optimum (software-pipeline stages 2-3 and 256-token tiles, 40-80%
# slower in the sweeps of 2026-12-06 and 2026-12-07, are no longer in it)
SWEEP_TILES = ((128, 4, 1, 64, 0), (128, 4, 1, 64, 1), (128, 4, 1, 64, 2), (128, 4, 1, 64, 2, 160),
               (128, 4, 1, 64, 1, 160), (128, 4, 1, 64, 2, 128), (64, 4, 1, 64, 0), (64, 4, 1, 64, 2),
               (128, 8, 1, 64, 2), (64, 2, 1, 64, 2),
               (64, 8, 1, 128, 0), (64, 8, 1, 128, 2), (128, 8, 1, 128, 2))
# None = triton_attention.split_count (H100, 160 registers: 4 at bs32 @ 4K, 16 at bs8 @ 32K, 32 at batch 1 and
# 32K-128K, picked by wave fill since 2026-12-07 16:37); 8 and 32 are its neighbours
SWEEP_SPLITS = (None, 8, 32)


# (batch, context, query tokens per sequence): the last chunk of a 32K prompt at two chunk sizes, 8 short prompts
PREFILL_SHAPES = ((1, 32768, 2048), (1, 32768, 8192), (8, 2048, 2048))


def run_prefill() -> list[dict]:
    """One chunked-prefill step: FlashAttention on a bf16 paged cache (vLLM's bf16 path) vs our Triton kernel vs
    our FlashAttention over dequantized K/V (dense_prefill), default preset."""
    from vllm_gds_plugin.compat.flash_attention import varlen_flash_attention
    from vllm_gds_plugin.kernels.turboquant import dense_prefill

    rows = []
    for batch, ctx, q_len in PREFILL_SHAPES:
        state, cache = random_cache("turboquant", batch, ctx)
        q = torch.randn(batch * q_len, HQ, D, dtype=torch.bfloat16, device="cuda")
        bt = block_table(batch, ctx)
        out = torch.empty_like(q)
        tokens = dense_prefill.workspace_tokens_for(256 << 20, HKV, D, q_len)
        plan = dense_prefill.plan([q_len] * batch, [ctx] * batch, tokens, torch.device("cuda"))
        varlen = varlen_flash_attention("cuda", D)
        contenders = {"fa_bf16": lambda: bench_fa(batch, ctx, q_len),
                      "ours_triton": lambda: bench_ours("turboquant", batch, ctx, q_len=q_len),
                      "ours_dense": lambda: {"ms": bench_ms(lambda: dense_prefill.attention(
                          q, cache, bt, plan, D ** -0.5, state, varlen, out))}}
        for name, fn in contenders.items():
            try:
                r = fn()
            except Exception as exc:  # noqa: BLE001 - one failing contender must not hide the others
                r = {"error": repr(exc)[:200]}
            torch.cuda.empty_cache()
            if "ms" in r:  # causal FLOPs of the step: 4 * q_len * (ctx - q_len / 2) * D per query head
                r["tflops"] = 4 * batch * HQ * D * q_len * (ctx - q_len / 2) / r["ms"] / 1e9
            rows.append({"batch": batch, "ctx": ctx, "q_len": q_len, "kernel": name, **r})
            print(json.dumps(rows[-1]), flush=True)
        del cache
        torch.cuda.empty_cache()
    return rows


# --tile's prefetch flag for Tile.prefetch 0 / 1 / 2 (none / the next tile's scales and K / all its words)
PREFETCH_FLAGS = ("", "k", "p")


def tile_name(tile) -> str:
    return (f"n{tile.block_n}w{tile.num_warps}s{tile.num_stages}m{tile.block_m}{PREFETCH_FLAGS[tile.prefetch]}"
            + (f"r{tile.maxnreg}" if tile.maxnreg else ""))


def parse_tile(text: str):
    """``--tile block_n,warps,stages,block_m[,p|k][,rN]`` (p: prefetch the next tile's words, k: its scales and K
    only; rN: at most N registers per thread) -> a Tile."""
    from vllm_gds_plugin.kernels.turboquant.triton_attention import Tile

    parts = text.split(",")
    cap = [int(x[1:]) for x in parts[4:] if x.startswith("r")]
    (flag,) = [x for x in parts[4:] if not x.startswith("r")] or [""]  # at most one prefetch flag
    return Tile(*(int(x) for x in parts[:4]), prefetch=PREFETCH_FLAGS.index(flag), maxnreg=cap[0] if cap else None)


def run_sweep(peak: float) -> list[dict]:
    """Launch shapes and split counts of our kernel on a few decode and prefill points (default preset)."""
    from vllm_gds_plugin.kernels.turboquant.triton_attention import Tile

    rows = []
    for batch, ctx, q_len in SWEEP_SHAPES:
        for shape in SWEEP_TILES:
            tile = Tile(*shape)
            if q_len == 1 and tile.block_m != 64:
                continue  # rows per program only matter for multi-token queries
            for splits in SWEEP_SPLITS if q_len == 1 else (None,):
                try:
                    r = bench_ours("turboquant", batch, ctx, tile, splits, q_len)
                    r["gbs"] = r["bytes"] / r["ms"] / 1e6
                    r["pct_peak"] = 100 * r["gbs"] / peak
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this shape
                    r = {"error": repr(exc)[:200]}
                torch.cuda.empty_cache()
                rows.append({"batch": batch, "ctx": ctx, "q_len": q_len, "splits": splits,
                             "kernel": f"ours_turboquant {tile_name(tile)}",
                             "tile": list(shape), **r})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_fa(batch: int, ctx: int, q_len: int = 1, fp8: bool = False) -> dict:
    """FlashAttention on a paged bf16 cache, or (``fp8``) on an fp8 e4m3 cache as vLLM's ``--kv-cache-dtype fp8``
    runs it on Hopper: FA3 with the query quantized to fp8 too and per-(sequence, KV head) descales (unit here)."""
    k = torch.randn(batch * ctx // BLOCK, BLOCK, HKV, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(batch * q_len, HQ, D, dtype=torch.bfloat16, device="cuda")
    bt = block_table(batch, ctx)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * q_len
    descale = {}
    if fp8:
        q, k, v = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
        one = torch.ones(batch, HKV, dtype=torch.float32, device="cuda")
        descale = {"q_descale": one, "k_descale": one, "v_descale": one}
    nbytes = 2 * k.numel() * k.element_size()
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        version = 3 if torch.cuda.get_device_capability()[0] >= 9 else 2

        def fa() -> None:
            flash_attn_varlen_func(q, k, v, max_seqlen_q=q_len, cu_seqlens_q=cu_q, max_seqlen_k=ctx,
                                   seqused_k=seq_lens, softmax_scale=D ** -0.5, causal=True, block_table=bt,
                                   fa_version=version, **descale)
        return {"ms": bench_ms(fa), "bytes": nbytes, "impl": f"vllm_flash_attn FA{version}"}
    except Exception as exc:  # noqa: BLE001 - fall back, and say so in the table
        if fp8:
            raise
        kk = k.view(batch, ctx, HKV, D).transpose(1, 2)
        vv = v.view(batch, ctx, HKV, D).transpose(1, 2)
        qq = q.view(batch, HQ, 1, D)

        def sdpa() -> None:
            torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
        return {"ms": bench_ms(sdpa), "bytes": nbytes, "impl": f"torch SDPA (FA unavailable: {exc!r:.80})"}


def bench_native(name: str, batch: int, ctx: int) -> dict:
    try:
        from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
        from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
        from vllm.v1.attention.ops.triton_turboquant_decode import triton_turboquant_decode_attention
    except Exception as exc:  # noqa: BLE001
        return {"error": f"not importable: {exc!r:.100}"}
    cfg = TurboQuantConfig.from_cache_dtype(name, D)
    cache = torch.randint(0, 256, (batch * ctx // BLOCK, BLOCK, HKV, cfg.slot_size_aligned), dtype=torch.uint8,
                          device="cuda")
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    pi = torch.linalg.qr(torch.randn(D, D, device="cuda"))[0]
    cent = get_centroids(D, cfg.mse_bits).cuda()
    bt = block_table(batch, ctx)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")

    def native() -> None:
        triton_turboquant_decode_attention(q, cache, bt, seq_lens, pi, cent, D ** -0.5, cfg.mse_bits,
                                           cfg.key_packed_size, cfg.effective_value_quant_bits,
                                           key_fp8=cfg.key_fp8, norm_correction=cfg.norm_correction,
                                           PiT=pi.T.contiguous())
    return {"ms": bench_ms(native), "bytes": batch * ctx * HKV * cfg.slot_size_aligned}


def run_profile(batch: int = 32, ctx: int = 4096, store_block_t: int | None = None) -> list[dict]:
    """GPU time per kernel of one decode layer of ours (store of the batch's new K/V + attention), from
    torch.profiler (CUDA-graph free, so launch gaps are not counted). ``store_block_t``: the store kernel's tokens
    per program (None: its default)."""
    from torch.profiler import ProfilerActivity, profile

    from vllm_gds_plugin.kernels.turboquant import ops, triton_store
    from vllm_gds_plugin.kvcache.presets import get_preset
    from vllm_gds_plugin.kvcache.quantizer import TurboQuantState

    state = TurboQuantState.build(get_preset("turboquant"), D, 0, device="cuda")
    cache = torch.zeros((batch * ctx // BLOCK, BLOCK, HKV, state.slot_bytes), dtype=torch.uint8, device="cuda")
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, HKV, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    bt = block_table(batch, ctx)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    slots = (torch.arange(batch, device="cuda") * ctx + ctx - 1).long()
    out = torch.empty_like(q)

    def layer() -> None:
        triton_store.store(k, v, cache, slots, state, block_t=store_block_t)
        ops.attention(q, cache, bt, seq_lens, qsl, D ** -0.5, state, out)

    for _ in range(3):
        layer()
    torch.cuda.synchronize()
    reps = 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            layer()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / reps
        if us > 0 and e.count >= reps:
            rows.append({"kernel": e.key[:90], "us_per_layer": round(us, 2), "calls_per_layer": e.count // reps})
    rows.sort(key=lambda r: -r["us_per_layer"])
    total = sum(r["us_per_layer"] for r in rows)
    for r in rows:
        print(f"{r['us_per_layer']:9.2f} us  x{r['calls_per_layer']}  {r['kernel']}")
    print(f"{total:9.2f} us  total GPU time per layer (bs{batch} @ {ctx})")
    return rows


def run_check() -> int:
    root = Path(__file__).resolve().parent.parent
    # From /tmp: `python -m pytest` puts its working directory first on sys.path, and the source tree's
    # vllm_gds_plugin (no kernels subpackage: that is mapped in at install) would shadow the installed plugin.
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "--durations=0",
                            *(str(root / "tests" / f"test_tq_{n}.py") for n in ("core", "kernels", "edge_values"))],
                           cwd=tempfile.gettempdir())


def versions() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name(),
            "command": " ".join(sys.argv)}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        info["vllm"] = None
    info["driver"] = smi("driver_version")
    return info


def save(stem: str, result: dict) -> Path:
    """``result`` as ``benchmarks/results/<stem>.json``, and into $OUT when set (the GPU machine); the last path."""
    paths = out_copies(Path(__file__).parent / "results" / f"{stem}.json")
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2) + "\n")
    return paths[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="run the correctness tests compiled on this GPU")
    ap.add_argument("--sweep", action="store_true", help="sweep our kernel's launch shapes instead of the table")
    ap.add_argument("--prefill", action="store_true", help="one chunked-prefill step per shape instead of the table")
    ap.add_argument("--profile", action="store_true", help="GPU time per kernel of one decode layer (bs32 @ 4K)")
    ap.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    ap.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    ap.add_argument("--kernels", nargs="*", help="only these contenders (e.g. fa_bf16 ours_turboquant)")
    ap.add_argument("--tile", type=parse_tile, help="our launch shape for the table instead of default_tile: "
                    "block_n,warps,stages,block_m[,p|k][,rN] (p: prefetch the next KV tile, k: its scales and K "
                    "only; rN: at most N registers per thread)")
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="also time our presets at these forced KV split counts (rows ours_<preset>@<splits>)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_tq_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.check:
        return run_check()
    if args.profile:  # the store kernel's default beside its 16-token tiles (the default before 2026-12-06 17:20)
        result = {**versions(), "kind": "decode_layer_profile",
                  "shape": f"bs32 @ 4096, {HQ} q / {HKV} KV heads, D={D}, default preset, torch.profiler GPU time "
                           "per layer (20 reps)",
                  "variants": {name: run_profile(store_block_t=bt) for name, bt in (("store_default", None),
                                                                                   ("store_tiles_16", 16))}}
        save(f"profile_decode_layer-{time.strftime('%Y%m%d-%H%M%S')}", result)
        return 0
    t0 = time.time()
    peak = hbm_peak_gbs()
    rows = run_sweep(peak) if args.sweep else run_prefill() if args.prefill else []
    for batch in [] if args.sweep or args.prefill else args.batches:
        for ctx in args.contexts:
            need = batch * ctx * HKV * D * 2 * 2 * 1.1  # the bf16 cache dominates
            if need > torch.cuda.mem_get_info()[0]:
                print(f"skip bs{batch} ctx{ctx}: bf16 cache does not fit", flush=True)
                continue
            contenders = {"fa_bf16": lambda: bench_fa(batch, ctx), "fa_fp8": lambda: bench_fa(batch, ctx, fp8=True)}
            contenders |= {f"ours_{p}": (lambda p=p: bench_ours(p, batch, ctx, args.tile)) for p in OUR_PRESETS}
            contenders |= {f"ours_{p}@{n}": (lambda p=p, n=n: bench_ours(p, batch, ctx, args.tile, n))
                           for p in OUR_PRESETS for n in args.splits}
            contenders |= {n: (lambda n=n: bench_native(n, batch, ctx)) for n in NATIVE_PRESETS}
            for name, fn in contenders.items():
                if args.kernels and name.partition("@")[0] not in args.kernels:
                    continue
                try:
                    r = fn()
                except Exception as exc:  # noqa: BLE001 - one failing contender must not hide the others
                    r = {"error": repr(exc)[:200]}
                torch.cuda.empty_cache()
                if "ms" in r:
                    r["gbs"] = r["bytes"] / r["ms"] / 1e6
                    r["pct_peak"] = 100 * r["gbs"] / peak
                rows.append({"batch": batch, "ctx": ctx, "kernel": name, **r})
                print(json.dumps(rows[-1]), flush=True)
    result = {**versions(), "tile": None if args.tile is None else tile_name(args.tile), "hbm_peak_gbs": peak,
              "shape": {"hq": HQ, "hkv": HKV, "d": D, "block": BLOCK},
              "rows": rows, "seconds": time.time() - t0}
    if args.prefill:
        result["kind"] = "attention_prefill"  # report.py's renderer
    kind = "bench_tq_attention_sweep" if args.sweep else "bench_tq_prefill" if args.prefill else "bench_tq_attention"
    saved = save(f"{kind}_{time.strftime('%Y%m%d-%H%M%S')}", result)
    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  vllm {result['vllm']}"
          f"  HBM peak {peak:.0f} GB/s")
    if args.prefill:
        fa = {(r["batch"], r["ctx"], r["q_len"]): r.get("ms") for r in rows if r["kernel"] == "fa_bf16"}
        for r in rows:
            base = fa.get((r["batch"], r["ctx"], r["q_len"]))
            print(f"bs{r['batch']} ctx{r['ctx']} q{r['q_len']} {r['kernel']:<12} " + (
                f"{r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s" + (f" {base / r['ms']:.2f}x FA" if base else "")
                if "ms" in r else r["error"][:80]))
        print(f"saved {saved}")
        return 0
    if args.sweep:
        best = {}
        for r in rows:
            key = (r["batch"], r["ctx"], r["q_len"])
            if "ms" in r and r["ms"] < best.get(key, {"ms": 1e9})["ms"]:
                best[key] = r
        for (b, c, q), r in best.items():
            print(f"best bs{b} ctx{c} q{q}: tile {r['tile']} splits {r['splits']} {r['ms']:.3f} ms "
                  f"{r['pct_peak']:.0f}% of peak")
        print(f"saved {saved}")
        return 0
    print(f"{'bs':>3} {'ctx':>7} {'kernel':<22} {'ms':>8} {'GB/s':>7} {'%peak':>6} {'vs FA':>6}")
    fa = {(r["batch"], r["ctx"]): r.get("ms") for r in rows if r["kernel"] == "fa_bf16"}
    for r in rows:
        if "ms" not in r:
            print(f"{r['batch']:>3} {r['ctx']:>7} {r['kernel']:<22} {r['error'][:60]}")
            continue
        base = fa.get((r["batch"], r["ctx"]))
        speed = f"{base / r['ms']:.2f}x" if base else "-"
        print(f"{r['batch']:>3} {r['ctx']:>7} {r['kernel']:<22} {r['ms']:>8.3f} {r['gbs']:>7.0f} "
              f"{r['pct_peak']:>5.0f}% {speed:>6}")
    print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
