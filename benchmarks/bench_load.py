"""Weight-loading throughput of ``--load-format gds-sharded`` on one GPU, against its ceilings and anchors.

ONE command, one run, same files (Llama-3.1-8B shapes as vLLM's parameters, dummy bytes, written once under
``--dir``), bf16 (16 GB) and FP8 (8 GB), within a time budget (``--budget-s``; steps past it are recorded as
skipped):

* ceilings: pinned H2D (1 GiB pinned buffer to the GPU), and page cache -> pinned memory with N reader threads
  and no GPU copy (what the CPU side alone can feed);
* anchors (warm): safetensors ``load_file(..., device="cuda")``; vLLM's ``fastsafetensors`` load format iterator;
* ours (``vllm_gds_plugin.loading.loader.load_rank``: checks + read + copy into preallocated parameters, the
  time the log line reports), warm from the page cache: the ``buffered`` ring and the zero-copy ``mapped`` io
  side by side for several thread counts / chunk sizes, then verify off/on for the best of each
  (overhead = verify-on time / verify-off time - 1); FP8 with the best configurations and from /dev/shm;
* cold (FP8 files; page cache dropped with /proc/sys/vm/drop_caches as root, per-file POSIX_FADV_DONTNEED
  otherwise): ours (auto -> O_DIRECT) next to ``dd iflag=direct`` of the same files;
* ``vllm serve``-like time-to-ready, 8B FP8, each engine in its own process: ``LLM(load_format="gds-sharded")``
  on the ``vllm-gds shard`` output vs the default loader on the FP8 HF checkpoint it was made from (dummy
  values), with vLLM's "Model loading took" seconds (the weight-loading share).

Targets (issue 4): warm >= 45 GB/s and >= 0.8 x pinned H2D; cold >= 0.9 x dd; verify overhead <= 5%.
Results: benchmarks/results/bench_load-<utc>.json.

    python3 benchmarks/bench_load.py --dir /tmp/bench-load
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

from vllm_gds_plugin.loading.loader import LoadOptions, load_rank
from vllm_gds_plugin.loading.manifest import (
    CreatedBy, Manifest, ModelInfo, Parallel, Quantization, RankEntry, Source, SourceFile, rank_dir,
)
from vllm_gds_plugin.loading.writer import split_parts, write_aligned_safetensors

GB = 1e9
# Llama-3.1-8B as vLLM holds it on one rank (fused qkv / gate_up).
HIDDEN, INTER, LAYERS, VOCAB, Q, KV, HEAD = 4096, 14336, 32, 128256, 32, 8, 128
LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
    "num_hidden_layers": LAYERS, "num_attention_heads": Q, "num_key_value_heads": KV, "vocab_size": VOCAB,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
}


def llama8b_params(fp8: bool) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    lin = torch.float8_e4m3fn if fp8 else torch.bfloat16
    out: list[tuple[str, tuple[int, ...], torch.dtype]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN), torch.bfloat16)]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name, shape, nscale in (("self_attn.qkv_proj", ((Q + 2 * KV) * HEAD, HIDDEN), 3),
                                    ("self_attn.o_proj", (HIDDEN, Q * HEAD), 1),
                                    ("mlp.gate_up_proj", (2 * INTER, HIDDEN), 2), ("mlp.down_proj", (HIDDEN, INTER), 1)):
            out.append((f"{p}.{name}.weight", shape, lin))
            if fp8:
                out.append((f"{p}.{name}.weight_scale", (nscale,), torch.float32))
        out += [(f"{p}.input_layernorm.weight", (HIDDEN,), torch.bfloat16),
                (f"{p}.post_attention_layernorm.weight", (HIDDEN,), torch.bfloat16)]
    return out + [("model.norm.weight", (HIDDEN,), torch.bfloat16), ("lm_head.weight", (VOCAB, HIDDEN), torch.bfloat16)]


def write_shards(out: Path, fp8: bool, part_bytes: int) -> Manifest:
    """A one-rank shard folder with dummy bytes (the loader's timing does not depend on values)."""
    if (out / "manifest.json").exists():
        return Manifest.load(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / rank_dir(0, 0)).mkdir(exist_ok=True)
    tensors = []
    for k, (name, shape, dtype) in enumerate(llama8b_params(fp8)):
        t = torch.empty(shape, dtype=dtype)
        t.view(-1).view(torch.uint8).fill_(k % 251)
        tensors.append((name, t))
    files = []
    for k, part in enumerate(split_parts(tensors, part_bytes)):
        rel = f"{rank_dir(0, 0)}/part-{k}.safetensors"
        files.append(write_aligned_safetensors(out / rel, part, rel))
    (out / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    m = Manifest(CreatedBy("bench", "-", torch.__version__), Source("dummy", {"config.json": SourceFile(0, "0" * 64)}),
                 ModelInfo("LlamaForCausalLM", "0" * 64, "bfloat16"), Parallel(1, 1),
                 Quantization("fp8", "per-tensor") if fp8 else Quantization("none", None),
                 {"pp0-tp0": RankEntry(tuple(files))})
    m.save(out)
    return Manifest.load(out)


def files_of(m: Manifest) -> list[Path]:
    assert m.origin is not None
    return [m.origin.parent / f.path for f in m.rank(0, 0).files]


class Budget:
    """Wall-clock budget of the whole run: optional steps are skipped (and recorded so) once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def run(self, need_s: float, fn: Callable[[], dict]) -> dict:
        if self.left() < need_s:
            return {"skipped": f"time budget: {self.left():.0f} s left, step needs ~{need_s:.0f} s"}
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed step must not lose the rest of the run
            return {"error": f"{type(e).__name__}: {e}"}


def drop_cache(paths: list[Path]) -> str:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "fadvise_dontneed"


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def timed(fn: Callable[[], object], nbytes: int) -> dict:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    return {"seconds": round(s, 4), "gb_per_s": round(nbytes / s / GB, 2)}


def pinned_ceiling() -> dict:
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    return timed(lambda: [dst.copy_(src, non_blocking=True) for _ in range(8)], 8 << 30)


def read_ceiling(paths: list[Path], nbytes: int, threads: int, chunk: int = 16 << 20) -> dict:
    """Page cache -> pinned buffers with ``threads`` preadv readers, no GPU copy: the CPU side's own limit."""
    bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(threads)]
    views = [memoryview(b.numpy()) for b in bufs]
    work = [(p, off) for p in paths for off in range(0, p.stat().st_size, chunk)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}

    def reader(w: int) -> None:
        for p, off in work[w::threads]:
            os.preadv(fds[p], [views[w]], off)
    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(reader, range(threads)))
        s = time.perf_counter() - t
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"threads": threads, "seconds": round(s, 4), "gb_per_s": round(nbytes / s / GB, 2)}


def destinations(m: Manifest) -> dict[str, torch.Tensor]:
    return {t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="cuda")
            for f in m.rank(0, 0).files for t in f.tensors}


def ours(m: Manifest, dest: dict[str, torch.Tensor], **opts: object) -> dict:
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rep = load_rank(m, 0, 0, dest, LoadOptions(**opts))
    out = {"seconds": round(rep.seconds, 4), "gb_per_s": round(rep.gb_per_s, 2), "mode": rep.mode,
           "extra_gpu_bytes": torch.cuda.max_memory_allocated() - before, "options": opts, "detail": rep.detail}
    if rep.note:
        out["note"] = rep.note
    return out


def safetensors_load(paths: list[Path], nbytes: int) -> dict:
    from safetensors.torch import load_file

    def run() -> None:
        for p in paths:
            d = load_file(str(p), device="cuda")
            del d
    return timed(run, nbytes)


def vllm_fastsafetensors(paths: list[Path], nbytes: int) -> dict:
    from vllm.model_executor.model_loader.weight_utils import fastsafetensors_weights_iterator

    def run() -> None:
        for _name, t in fastsafetensors_weights_iterator([str(p) for p in paths], False):
            del t
    return timed(run, nbytes)


def dd_direct(paths: list[Path], nbytes: int) -> dict:
    t = time.perf_counter()
    for p in paths:
        subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=16M", "iflag=direct"], check=True, capture_output=True)
    s = time.perf_counter() - t
    return {"seconds": round(s, 4), "gb_per_s": round(nbytes / s / GB, 2)}


# Warm variants compared side by side (bf16): io, threads, chunk MiB; the ring is the default 512 MiB.
SWEEP = [("buffered", 4, 16), ("buffered", 8, 16), ("buffered", 16, 16), ("buffered", 16, 8), ("buffered", 8, 32),
         ("mapped", 4, 16), ("mapped", 8, 16), ("mapped", 16, 16), ("mapped", 16, 32), ("mapped", 8, 64)]


def best(rows: dict, io: str) -> dict | None:
    """Options of the fastest row that really ran with ``io`` (a mapped row may have fallen back)."""
    ok = [r for r in rows.values() if isinstance(r, dict) and r.get("mode", "").endswith(f"({io})")]
    return max(ok, key=lambda r: r["gb_per_s"])["options"] if ok else None


def verify_overhead(m: Manifest, dest: dict[str, torch.Tensor], opts: dict) -> dict:
    """verify off / on / off back to back with the same options: overhead against the faster 'off'."""
    off1, on, off2 = ours(m, dest, **opts), ours(m, dest, **opts, verify=True), ours(m, dest, **opts)
    off_s = min(off1["seconds"], off2["seconds"])
    return {"options": opts, "off": [off1, off2], "on": on, "overhead": round(on["seconds"] / off_s - 1, 4)}


def bench_bf16(m: Manifest, budget: Budget, log: Callable[[str], None]) -> dict:
    paths, nbytes = files_of(m), m.rank(0, 0).nbytes
    res: dict = {"bytes": nbytes, "files": len(paths)}
    warm(paths)
    res["read_ceiling"] = [budget.run(5, lambda n=n: read_ceiling(paths, nbytes, n)) for n in (8, 16)]
    log(f"  page cache -> pinned, no GPU copy: {[r.get('gb_per_s') for r in res['read_ceiling']]} GB/s (8, 16 threads)")
    res["safetensors_load_file_warm"] = budget.run(10, lambda: safetensors_load(paths, nbytes))
    torch.cuda.empty_cache()
    res["vllm_fastsafetensors_warm"] = budget.run(30, lambda: vllm_fastsafetensors(paths, nbytes))
    torch.cuda.empty_cache()
    log(f"  anchors: safetensors {res['safetensors_load_file_warm'].get('gb_per_s')} GB/s, vLLM fastsafetensors "
        f"{res['vllm_fastsafetensors_warm'].get('gb_per_s')} GB/s")
    dest = destinations(m)
    res["ours_default_first"] = budget.run(5, lambda: ours(m, dest))
    sweep: dict = {}
    for io, threads, chunk in SWEEP:
        key = f"{io}_t{threads}_c{chunk}"
        sweep[key] = budget.run(5, lambda: ours(m, dest, io=io, threads=threads, chunk_mib=chunk))
        r = sweep[key]
        log(f"  ours {key}: {r.get('gb_per_s')} GB/s {r.get('mode', r)} {r.get('detail', '')} {r.get('note', '')}")
    res["ours_sweep"] = sweep
    res["ours_default"] = budget.run(5, lambda: ours(m, dest))
    for io in ("buffered", "mapped"):
        opts = best(sweep, io)
        if opts is not None:
            res[f"verify_{io}"] = v = budget.run(10, lambda: verify_overhead(m, dest, opts))
            log(f"  verify ({io}, {opts}): overhead {v.get('overhead')} "
                f"(on {v.get('on', {}).get('gb_per_s')} GB/s)")
    res["best_gb_per_s"] = max([r["gb_per_s"] for r in sweep.values() if "gb_per_s" in r] or [0.0])
    del dest
    torch.cuda.empty_cache()
    return res


def bench_fp8(m: Manifest, bf16: dict, budget: Budget, log: Callable[[str], None]) -> dict:
    paths, nbytes = files_of(m), m.rank(0, 0).nbytes
    res: dict = {"bytes": nbytes, "files": len(paths)}
    warm(paths)
    res["safetensors_load_file_warm"] = budget.run(10, lambda: safetensors_load(paths, nbytes))
    torch.cuda.empty_cache()
    res["vllm_fastsafetensors_warm"] = budget.run(20, lambda: vllm_fastsafetensors(paths, nbytes))
    torch.cuda.empty_cache()
    dest = destinations(m)
    res["ours_default"] = budget.run(5, lambda: ours(m, dest))
    for io in ("buffered", "mapped"):
        opts = best(bf16.get("ours_sweep", {}), io)
        if opts is not None:
            res[f"ours_best_{io}"] = budget.run(5, lambda: ours(m, dest, **opts))
            res[f"ours_best_{io}_verify"] = budget.run(5, lambda: ours(m, dest, **opts, verify=True))
    log(f"  warm: default {res['ours_default'].get('gb_per_s')} GB/s, best buffered "
        f"{res.get('ours_best_buffered', {}).get('gb_per_s')}, best mapped {res.get('ours_best_mapped', {}).get('gb_per_s')}"
        f"; safetensors {res['safetensors_load_file_warm'].get('gb_per_s')}, vLLM fastsafetensors "
        f"{res['vllm_fastsafetensors_warm'].get('gb_per_s')}")
    shm = Path("/dev/shm/bench-gds-sharded")

    def from_shm() -> dict:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.copytree(m.origin.parent, shm)  # type: ignore[union-attr]
        try:
            sm = Manifest.load(shm)
            return {"auto": ours(sm, dest), "mapped": ours(sm, dest, io="mapped")}
        finally:
            shutil.rmtree(shm, ignore_errors=True)
    res["ours_shm"] = budget.run(20, from_shm)
    res["best_gb_per_s"] = max([r["gb_per_s"] for k, r in res.items() if k.startswith("ours_") and "gb_per_s" in r]
                               or [0.0])

    def cold() -> dict:
        out = {"method": drop_cache(paths), "ours": ours(m, dest)}
        drop_cache(paths)
        out["dd_iflag_direct"] = dd_direct(paths, nbytes)
        out["ratio_to_dd"] = round(out["ours"]["gb_per_s"] / out["dd_iflag_direct"]["gb_per_s"], 3)
        return out
    res["cold"] = c = budget.run(40, cold)
    log(f"  cold: ours {c.get('ours', {}).get('gb_per_s')} GB/s ({c.get('ours', {}).get('mode')}), "
        f"dd iflag=direct {c.get('dd_iflag_direct', {}).get('gb_per_s')} GB/s {c.get('error', c.get('skipped', ''))}")
    del dest
    torch.cuda.empty_cache()
    return res


def write_hf_fp8_checkpoint(dst: Path) -> None:
    """An FP8 (per-tensor, the layout of vLLM's ``fp8`` method) HF checkpoint with Llama-3.1-8B's names and
    shapes and constant dummy values: written at disk speed, no quantization pass (time-to-ready does not depend
    on the values; they are finite)."""
    from safetensors.torch import save_file

    from vllm_gds_plugin.loading.fp8 import FP8Scheme

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.full((VOCAB, HIDDEN), 0.01, dtype=torch.bfloat16),
                                        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                                        "lm_head.weight": torch.full((VOCAB, HIDDEN), 0.01, dtype=torch.bfloat16)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name, shape in (("self_attn.q_proj", (Q * HEAD, HIDDEN)), ("self_attn.k_proj", (KV * HEAD, HIDDEN)),
                            ("self_attn.v_proj", (KV * HEAD, HIDDEN)), ("self_attn.o_proj", (HIDDEN, Q * HEAD)),
                            ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)),
                            ("mlp.down_proj", (HIDDEN, INTER))):
            w = torch.empty(shape, dtype=torch.float8_e4m3fn)
            w.view(torch.uint8).fill_(0x28)  # 0.03125 in e4m3
            tensors[f"{p}.{name}.weight"] = w
            tensors[f"{p}.{name}.weight_scale"] = torch.tensor(0.01, dtype=torch.float32)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    weight_map, part, size, k = {}, {}, 0, 0
    for name, t in tensors.items():
        part[name] = t
        size += t.numel() * t.element_size()
        if size > 2 << 30 or name == next(reversed(tensors)):
            fname = f"model-{k:05d}.safetensors"
            save_file(part, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
            part, size, k = {}, 0, k + 1
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(LLAMA_8B_CONFIG, quantization_config=FP8Scheme("per-tensor").quantization_config())
    (tmp / "config.json").write_text(json.dumps(cfg))
    tmp.rename(dst)


ENGINE_CHILD = """
import json, sys, time
t = time.perf_counter()
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], load_format=sys.argv[2], enforce_eager=True, max_model_len=4096,
          gpu_memory_utilization=0.85, skip_tokenizer_init=True)
ready = time.perf_counter() - t
out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5, 6]}],
                   SamplingParams(max_tokens=4, temperature=0.0, detokenize=False))
print("BENCH_RESULT " + json.dumps({"time_to_ready_s": round(ready, 2), "tokens": list(out[0].outputs[0].token_ids)}))
"""
SHARD_CHILD = """
import sys
from pathlib import Path
from vllm_gds_plugin.loading.sharder import ShardOptions, shard
shard(ShardOptions(src=Path(sys.argv[1]), out=Path(sys.argv[2]), quantization="fp8", overwrite=True))
"""


def child(code: str, args: list[str], timeout_s: float) -> tuple[str, float]:
    """Run ``code`` in a fresh interpreter (from /tmp with -P: the repo must not shadow the installed plugin)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-P", "-c", code, *args], cwd="/tmp", capture_output=True, text=True,
                       timeout=timeout_s)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {out[-2000:]}")
    return out, time.perf_counter() - t


def engine_time_to_ready(root: Path, budget: Budget, log: Callable[[str], None]) -> dict:
    """Time-to-ready of a fresh engine process: default loader on the FP8 HF checkpoint vs gds-sharded on its
    ``vllm-gds shard`` output (files warm in the page cache for both)."""
    res: dict = {}
    hf = root / "hf-llama8b-fp8-dummy"
    if not hf.exists():
        t = time.perf_counter()
        write_hf_fp8_checkpoint(hf)
        res["write_hf_s"] = round(time.perf_counter() - t, 1)
    out = root / "shard-llama8b-fp8-dummy"
    if not (out / "manifest.json").exists():
        _, s = child(SHARD_CHILD, [str(hf), str(out)], max(30.0, budget.left() - 120))
        res["shard_s"] = round(s, 1)
    log(f"  engine checkpoints ready ({res})")
    for name, model, fmt in (("gds_sharded_fp8", out, "gds-sharded"), ("default_loader_fp8", hf, "safetensors")):
        def start(model: Path = model, fmt: str = fmt) -> dict:
            warm(sorted(model.rglob("*.safetensors")))
            text, wall = child(ENGINE_CHILD, [str(model), fmt], max(30.0, budget.left()))
            r = json.loads(text.split("BENCH_RESULT ", 1)[1].splitlines()[0])
            r["process_wall_s"] = round(wall, 2)
            if m := re.search(r"Model loading took ([\d.]+) GiB(?: memory)? and ([\d.]+) seconds", text):
                r["model_loading_gib"], r["model_loading_s"] = float(m.group(1)), float(m.group(2))
            r["log_lines"] = [ln[-240:] for ln in text.splitlines() if "gds-sharded rank" in ln or "Loading weights took" in ln]
            return r
        res[name] = r = budget.run(40, start)
        log(f"  {name}: ready in {r.get('time_to_ready_s')} s, model loading {r.get('model_loading_s')} s "
            f"{r.get('error', r.get('skipped', ''))[:300]}")
    return res


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0), "host": platform.node(), "cpus": len(os.sched_getaffinity(0)),
           "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    for mod in ("vllm", "triton", "fastsafetensors", "xxhash"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[mod] = None
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["driver"] = None
    from vllm_gds_plugin.loading.readers.gds import gds_unavailable_reason
    out["gds_unavailable_reason"] = gds_unavailable_reason(torch.device("cuda", 0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-load"),
                    help="local-disk folder for the checkpoints (~40 GB; reused when present)")
    ap.add_argument("--part-gib", type=float, default=1.0, help="shard file size (verify hashes files in parallel)")
    ap.add_argument("--budget-s", type=float, default=345, help="wall-clock budget; later steps are skipped")
    ap.add_argument("--no-engine", action="store_true", help="skip the LLM time-to-ready comparison")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    budget = Budget(args.budget_s)

    def log(msg: str) -> None:
        print(f"[{args.budget_s - budget.left():5.0f} s] {msg}", flush=True)

    result: dict = {"command": " ".join([sys.executable, *sys.argv]), "utc": datetime.now(timezone.utc).isoformat(),
                    "versions": versions()}
    log(json.dumps(result["versions"]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_load-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"

    def save() -> None:  # after every section: a run cut short still leaves its numbers
        path.write_text(json.dumps(result, indent=1) + "\n")

    result["pinned_h2d_ceiling"] = pinned_ceiling()
    pinned = result["pinned_h2d_ceiling"]["gb_per_s"]
    log(f"pinned H2D ceiling: {pinned} GB/s")
    for kind in ("bf16", "fp8"):
        t = time.perf_counter()
        m = write_shards(args.dir / f"bench-{kind}", kind == "fp8", int(args.part_gib * (1 << 30)))
        log(f"{kind}: {m.rank(0, 0).nbytes / GB:.2f} GB in {len(m.rank(0, 0).files)} files "
            f"(ready in {time.perf_counter() - t:.0f} s)")
        result[kind] = r = bench_bf16(m, budget, log) if kind == "bf16" else bench_fp8(m, result["bf16"], budget, log)
        r["targets"] = {"warm_ge_45": r["best_gb_per_s"] >= 45, "warm_ge_0.8_pinned": r["best_gb_per_s"] >= 0.8 * pinned}
        if kind == "bf16":
            r["targets"]["verify_le_5pct"] = {io: r[f"verify_{io}"].get("overhead", 1) <= 0.05
                                              for io in ("buffered", "mapped") if f"verify_{io}" in r}
        elif "ratio_to_dd" in r["cold"]:
            r["targets"]["cold_ge_0.9_dd"] = r["cold"]["ratio_to_dd"] >= 0.9
        log(f"  {kind} targets: {r['targets']}")
        save()
    if not args.no_engine:
        result["engine"] = budget.run(90, lambda: engine_time_to_ready(args.dir, budget, log))
        save()
    result["elapsed_s"] = round(args.budget_s - budget.left(), 1)
    save()
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
