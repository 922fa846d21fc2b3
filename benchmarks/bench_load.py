"""Weight-loading throughput of ``--load-format gds-sharded`` on one GPU, against its ceilings and anchors.

One run, same files (Llama-3.1-8B shapes as vLLM's parameters, dummy bytes, written once under ``--dir`` on the
local disk and optionally copied to /dev/shm), for bf16 (16 GB) and FP8 (8 GB):

* pinned H2D ceiling: torch copy of a 1 GiB pinned buffer to the GPU;
* safetensors ``load_file(..., device="cuda")`` of the same files (warm);
* vLLM's ``fastsafetensors`` load format's iterator (when vLLM + fastsafetensors import), warm;
* ours (``vllm_gds_plugin.loading.loader.load_rank``: read + copy into preallocated parameters), warm from the
  page cache, warm with ``verify``, from /dev/shm, and cold (page cache dropped with /proc/sys/vm/drop_caches,
  or per-file POSIX_FADV_DONTNEED without root) next to ``dd iflag=direct`` of the same files.

Targets (issue 4): warm >= 45 GB/s and >= 0.8 x pinned H2D; cold >= 0.9 x dd. ``--engine`` adds
``LLM(load_format="gds-sharded")`` time-to-ready vs the default loader (separate run: it writes an HF checkpoint
and shards it with ``vllm-gds shard``). Results: benchmarks/results/bench_load-<utc>.json.

    python benchmarks/bench_load.py --dir /path/on/local/nvme [--shm] [--engine]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
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


def destinations(m: Manifest) -> dict[str, torch.Tensor]:
    return {t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="cuda")
            for f in m.rank(0, 0).files for t in f.tensors}


def ours(m: Manifest, dest: dict[str, torch.Tensor], **opts: object) -> dict:
    before = torch.cuda.memory_allocated()
    rep = load_rank(m, 0, 0, dest, LoadOptions(**opts))
    return {"seconds": round(rep.seconds, 4), "gb_per_s": round(rep.gb_per_s, 2), "mode": rep.mode,
            "extra_gpu_bytes": torch.cuda.memory_allocated() - before, "options": opts}


def safetensors_load(paths: list[Path], nbytes: int) -> dict:
    from safetensors.torch import load_file

    def run() -> None:
        for p in paths:
            d = load_file(str(p), device="cuda")
            del d
    return timed(run, nbytes)


def vllm_fastsafetensors(paths: list[Path], nbytes: int) -> dict:
    try:
        from vllm.model_executor.model_loader.weight_utils import fastsafetensors_weights_iterator
    except Exception as e:  # noqa: BLE001 - an anchor, reported as unavailable
        return {"error": f"{type(e).__name__}: {e}"}

    def run() -> None:
        for _name, t in fastsafetensors_weights_iterator([str(p) for p in paths], False):
            del t
    try:
        return timed(run, nbytes)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def dd_direct(paths: list[Path], nbytes: int) -> dict:
    t = time.perf_counter()
    for p in paths:
        subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=16M", "iflag=direct"], check=True, capture_output=True)
    s = time.perf_counter() - t
    return {"seconds": round(s, 4), "gb_per_s": round(nbytes / s / GB, 2)}


def bench_checkpoint(m: Manifest, shm: Path | None, log: Callable[[str], None]) -> dict:
    paths = files_of(m)
    nbytes = m.rank(0, 0).nbytes
    dest = destinations(m)
    res: dict = {"bytes": nbytes, "files": len(paths)}
    warm(paths)
    res["safetensors_load_file_warm"] = safetensors_load(paths, nbytes)
    torch.cuda.empty_cache()
    res["vllm_fastsafetensors_warm"] = vllm_fastsafetensors(paths, nbytes)
    torch.cuda.empty_cache()
    res["ours_warm"] = ours(m, dest)
    res["ours_warm_repeat"] = ours(m, dest)
    res["ours_warm_verify"] = ours(m, dest, verify=True)
    res["ours_warm_pinned512_threads16"] = ours(m, dest, pinned_mib=512, threads=16)
    log(f"  warm: ours {res['ours_warm_repeat']['gb_per_s']} GB/s ({res['ours_warm_repeat']['mode']}), "
        f"verify {res['ours_warm_verify']['gb_per_s']}, safetensors {res['safetensors_load_file_warm']['gb_per_s']}")
    if shm is not None:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.copytree(m.origin.parent, shm)  # type: ignore[union-attr]
        res["ours_shm"] = ours(Manifest.load(shm), dest)
        shutil.rmtree(shm)
    res["cold_method"] = drop_cache(paths)
    res["ours_cold"] = ours(m, dest)
    drop_cache(paths)
    res["ours_cold_direct_forced"] = ours(m, dest, io="direct")
    res["dd_iflag_direct"] = dd_direct(paths, nbytes)
    log(f"  cold: ours {res['ours_cold']['gb_per_s']} GB/s ({res['ours_cold']['mode']}), "
        f"dd {res['dd_iflag_direct']['gb_per_s']}")
    del dest
    torch.cuda.empty_cache()
    return res


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0), "host": platform.node()}
    for mod in ("vllm", "triton", "fastsafetensors"):
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


def engine_time_to_ready(root: Path, log: Callable[[str], None]) -> dict:
    """LLM(...) construction time: default loader on an FP8 HF checkpoint vs gds-sharded on its shards."""
    from vllm_gds_plugin.compat.loader import install
    from vllm_gds_plugin.loading.fp8 import FP8Scheme
    from vllm_gds_plugin.loading.sharder import ShardOptions, shard, write_fp8_checkpoint

    hf = root / "hf-llama8b-bf16"
    if not (hf / "model.safetensors.index.json").exists():
        write_hf_checkpoint(hf)
    hf_fp8 = root / "hf-llama8b-fp8"
    if not hf_fp8.exists():
        write_fp8_checkpoint(hf, hf_fp8, FP8Scheme("per-tensor"))
    out = root / "shard-llama8b-fp8"
    if not (out / "manifest.json").exists():
        shard(ShardOptions(src=hf, out=out, quantization="fp8", overwrite=True))
    install()
    from vllm import LLM

    res = {}
    for name, kwargs in (("gds_sharded_fp8", dict(model=str(out), load_format="gds-sharded")),
                         ("default_loader_fp8", dict(model=str(hf_fp8), load_format="safetensors"))):
        warm(list(Path(kwargs["model"]).rglob("*.safetensors")))
        t = time.perf_counter()
        llm = LLM(**kwargs, enforce_eager=True, max_model_len=4096, gpu_memory_utilization=0.8)
        res[name] = {"time_to_ready_s": round(time.perf_counter() - t, 2)}
        log(f"  {name}: ready in {res[name]['time_to_ready_s']} s")
        del llm
        import gc
        gc.collect()
        torch.cuda.empty_cache()
    return res


def write_hf_checkpoint(dst: Path) -> None:
    """A bf16 HF checkpoint with Llama-3.1-8B's names and shapes (dummy values), for the engine comparison."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.self_attn.q_proj.weight": (Q * HEAD, HIDDEN), f"{p}.self_attn.k_proj.weight": (KV * HEAD, HIDDEN),
                   f"{p}.self_attn.v_proj.weight": (KV * HEAD, HIDDEN), f"{p}.self_attn.o_proj.weight": (HIDDEN, Q * HEAD),
                   f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN), f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
                   f"{p}.mlp.down_proj.weight": (HIDDEN, INTER), f"{p}.input_layernorm.weight": (HIDDEN,),
                   f"{p}.post_attention_layernorm.weight": (HIDDEN,)}
    weight_map, part, size, k = {}, {}, 0, 0

    def flush() -> None:
        nonlocal part, size, k
        if part:
            fname = f"model-{k:05d}.safetensors"
            save_file(part, str(dst / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
            part, size, k = {}, 0, k + 1
    for name, shape in shapes.items():
        part[name] = (torch.randn(shape, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        size += part[name].numel() * 2
        if size > 4 << 30:
            flush()
    flush()
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="local-disk folder for the checkpoints (24 GB)")
    ap.add_argument("--shm", action="store_true", help="also load from a /dev/shm copy")
    ap.add_argument("--part-gib", type=float, default=1.0, help="shard file size (verify hashes files in parallel)")
    ap.add_argument("--only", choices=("bf16", "fp8"), help="one checkpoint instead of both")
    ap.add_argument("--engine", action="store_true", help="only the LLM time-to-ready comparison (needs vLLM)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(msg, flush=True)

    result: dict = {"command": " ".join([sys.executable, *sys.argv]), "utc": datetime.now(timezone.utc).isoformat(),
                    "versions": versions()}
    log(json.dumps(result["versions"]))
    if args.engine:
        result["engine"] = engine_time_to_ready(args.dir, log)
    else:
        result["pinned_h2d_ceiling"] = pinned_ceiling()
        log(f"pinned H2D ceiling: {result['pinned_h2d_ceiling']['gb_per_s']} GB/s")
        for kind in ("bf16", "fp8"):
            if args.only and kind != args.only:
                continue
            t = time.perf_counter()
            m = write_shards(args.dir / f"bench-{kind}", kind == "fp8", int(args.part_gib * (1 << 30)))
            log(f"{kind}: {m.rank(0, 0).nbytes / GB:.2f} GB in {len(m.rank(0, 0).files)} files "
                f"(ready in {time.perf_counter() - t:.0f} s)")
            result[kind] = bench_checkpoint(m, Path("/dev/shm/bench-gds-sharded") if args.shm else None, log)
            r = result[kind]
            r["targets"] = {"warm_ge_45": r["ours_warm_repeat"]["gb_per_s"] >= 45,
                            "warm_ge_0.8_pinned": r["ours_warm_repeat"]["gb_per_s"]
                            >= 0.8 * result["pinned_h2d_ceiling"]["gb_per_s"],
                            "cold_ge_0.9_dd": r["ours_cold"]["gb_per_s"] >= 0.9 * r["dd_iflag_direct"]["gb_per_s"]}
            log(f"  targets: {r['targets']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_load-{'engine-' if args.engine else ''}{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
