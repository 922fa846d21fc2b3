"""Child process of bench_tq_serving.py: one ``LLM`` engine, driven step by step, timing every engine step.

    python benchmarks/serving_steps.py '<config JSON>'      (bench_tq_serving.py builds the config)

Per workload (n requests of ``length`` random prompt tokens, greedy, ignore_eos) the requests are added to
``llm.llm_engine`` at once and ``step()`` is called until all finish (``LLMEngine.add_request`` / ``step`` exist
with the same meaning in vLLM 0.26 and 0.32). ``step()`` returns only after the engine produced that step's tokens
(in-process engine: it runs the step; engine-core process: it waits for the step's outputs), so the time between
two non-empty returns is one engine step as a client sees it. Each step is classified:

- prefill phase: until every request has its first token; ``prefill_s`` = wall time from adding the requests
  until the last first token (with chunked prefill, early requests already decode in these steps);
  ``prefill_engine_step_ms`` = each ``step()`` call of that phase, token-less ones included (a one-time cost, e.g.
  a kernel compiled on first use, shows as one long step);
- decode-only: after that and before any request finishes, every request gets exactly one new token. TPOT is the
  median of these step times (mean, p90 and count recorded too);
- tail: from the first finished request on.

``max_tokens`` is sized so that the decode-only window holds at least ``decode_steps`` steps: the first request can
produce at most one token per prefill-phase step, and prefilling n x length tokens takes at most
ceil(n * length / max_num_batched_tokens) + n steps (one partial chunk per request) plus a few steps of chunk
budget taken by the decoding requests (``EXTRA_STEPS``).

Before the workloads, untimed: a few long-ish requests (Triton JIT and allocator warm-up), then requests added one
per step until as many run as the largest workload has, so that the mixed prefill + decode steps (run eagerly,
outside CUDA graphs) meet every decode batch size once: attention kernels compile a variant per KV split count,
which follows the batch size, and a compile inside a timed prefill showed as one ~1 s step (2026-12-07 18:57).

Prints one line ``BENCH_RESULT {json}`` per workload as soon as it is measured (a later timeout keeps it).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

RESULT_TAG = "BENCH_RESULT "
EXTRA_STEPS = 8  # chunk budget used by already-decoding requests during the prefill phase, with margin


@dataclass
class Step:
    seconds: float  # since the previous non-empty step() return (the first: since the requests were added)
    new_tokens: dict[str, int]  # request id -> tokens this step produced
    finished: bool  # some request finished in this step


def classify(steps: list[Step], n: int) -> tuple[int | None, list[float], int]:
    """(index of the step in which the last request got its first token, decode-only step seconds, number of
    irregular steps in the decode window)."""
    started: set[str] = set()
    prefill_end = None
    decode: list[float] = []
    irregular = 0
    for i, step in enumerate(steps):
        if prefill_end is None:
            started.update(step.new_tokens)
            if len(started) == n:
                prefill_end = i
        elif step.finished:
            break
        elif len(step.new_tokens) == n and all(c == 1 for c in step.new_tokens.values()):
            decode.append(step.seconds)
        else:
            # Some running request got no token or several (a preempted request, a split output): not a clean
            # decode step of the full batch; counted and left out.
            irregular += 1
    return prefill_end, decode, irregular


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_workload(llm: Any, tag: str, n: int, length: int, decode_steps: int, rng: random.Random,
                 vocab_size: int) -> dict[str, Any]:
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    chunk = engine.vllm_config.scheduler_config.max_num_batched_tokens
    max_tokens = decode_steps + math.ceil(n * length / chunk) + n + EXTRA_STEPS
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                            detokenize=False, output_kind=RequestOutputKind.DELTA)
    # Fresh random prompts per workload: nothing to reuse even if prefix caching were on.
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, vocab_size) for _ in range(length)])
               for _ in range(n)]
    steps: list[Step] = []
    empty = 0
    produced: dict[str, int] = {}
    engine_ms: list[float] = []  # every engine step, token-less ones too: where prefill time goes
    ends: list[int] = []  # engine steps done when each entry of ``steps`` ended
    t0 = last = prev = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        engine_ms.append(1000 * (now - prev))
        prev = now
        if not outs:  # an engine step without new tokens (a prefill chunk, or async scheduling's lead step)
            empty += 1
            continue
        new = {o.request_id: len(o.outputs[0].token_ids) for o in outs}
        steps.append(Step(now - last, new, any(o.finished for o in outs)))
        ends.append(len(engine_ms))
        for rid, c in new.items():
            produced[rid] = produced.get(rid, 0) + c
        last = now
    if len(produced) != n or any(c != max_tokens for c in produced.values()):
        raise RuntimeError(f"{tag}: expected {n} requests x {max_tokens} tokens, got {produced}")
    prefill_end, decode, irregular = classify(steps, n)
    assert prefill_end is not None  # every request produced tokens (checked above)
    ms = [1000 * s for s in decode]
    return {
        "requests": n, "prompt_tokens": length, "max_tokens": max_tokens, "max_num_batched_tokens": chunk,
        "prefill_s": round(sum(s.seconds for s in steps[:prefill_end + 1]), 4),
        "prefill_steps": prefill_end + 1, "steps_with_tokens": len(steps), "steps_without_tokens": empty,
        "decode_only_steps": len(ms), "irregular_decode_window_steps": irregular,
        "decode_window_short": len(ms) < decode_steps,
        "tpot_ms": {"median": round(statistics.median(ms), 4), "mean": round(statistics.fmean(ms), 4),
                    "p90": round(percentile(ms, 90), 4), "min": round(min(ms), 4), "max": round(max(ms), 4),
                    "count": len(ms)} if ms else None,
        "decode_step_ms": [round(v, 3) for v in ms],
        "prefill_engine_step_ms": [round(v, 3) for v in engine_ms[:ends[prefill_end]]],
        "total_s": round(sum(s.seconds for s in steps), 3),
    }


def warm_up_batch_sizes(llm: Any, count: int, rng: random.Random, vocab_size: int) -> None:
    """Requests of 16 random tokens added one per engine step, each generating ``count`` tokens: the step after
    the i-th addition decodes i requests beside a prefill chunk, for i up to ``count`` - 1, then the decode batch
    shrinks back from ``count``."""
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=count, min_tokens=count, ignore_eos=True, detokenize=False)
    for i in range(count):
        engine.add_request(f"warm-{i}", TokensPrompt(prompt_token_ids=[rng.randrange(1000, vocab_size)
                                                                       for _ in range(16)]), params)
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(**cfg["engine"])
    rng = random.Random(0)
    wn, wlen, wtok = cfg["warmup"]  # Triton JIT and allocator warm-up, not timed
    llm.generate([TokensPrompt(prompt_token_ids=[rng.randrange(1000, cfg["vocab_size"]) for _ in range(wlen)])
                  for _ in range(wn)],
                 SamplingParams(temperature=0.0, max_tokens=wtok, ignore_eos=True, detokenize=False), use_tqdm=False)
    warm_up_batch_sizes(llm, max(n for n, _ in cfg["workloads"].values()), rng, cfg["vocab_size"])
    for label, (n, length) in cfg["workloads"].items():
        res = run_workload(llm, label, n, length, cfg["decode_steps"], rng, cfg["vocab_size"])
        print(RESULT_TAG + json.dumps({"workload": label, **res}), flush=True)


if __name__ == "__main__":
    main()
