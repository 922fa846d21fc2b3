"""`LLM(kv_cache_dtype="turboquant")` end to end on the real SmolLM2 (vLLM CPU, torch reference kernels).

One engine per configuration, shared by the tests of this module:
- bf16 KV ("auto"): the reference outputs, perplexity and KV capacity;
- turboquant presets (default ~3.5 bits, 3 bits, 4 bits) with prefix caching and chunked prefill ON
  (small token budget, so the long prompts below are prefilled in several chunks);
- the default preset with both OFF, whose outputs the ON engine must reproduce.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import FAST_ENGINE_KWARGS

from vllm_gds_plugin.compat.attention import install
from vllm_gds_plugin.kvcache.presets import get_preset

HEAD_DIM = 64  # SmolLM2-135M
BF16_SLOT_BYTES = 2 * HEAD_DIM * 2  # K and V, bf16
PPL_TOKENS = 512  # of lee_text (bf16 KV: 25.50 here, 27.97 on 1000 tokens, 28.05 on 4000)
GREEDY_TOKENS = 16  # tokens generated for the greedy comparison (issue 6 asks for N >= 16 identical)
CHUNK_BUDGET = 64  # max_num_batched_tokens of the ON engines: a 300-token prompt is prefilled in 5 chunks
# Issue 6's perplexity goals (relative increase over bf16 KV). NOT MET yet on SmolLM2. Measured here on 512 tokens
# (bf16 25.50) with the model's calibration (key centering, found next to the weights): 4bit +3.46%, turboquant
# (k4v3) +6.72%, 3bit +15.50% (uncalibrated before: +6.2%, +9.6%, +26.1%); issue 6 stays open.
GOALS = {"4bit": 0.01, "turboquant": 0.03, "3bit": 0.06}
# What the tests enforce meanwhile: regression bounds a little above those measurements, so that a change that
# makes quality worse fails CI. Tighten them to GOALS as the quantizer improves.
PPL_REGRESSION_BOUND = {"4bit": 0.05, "turboquant": 0.085, "3bit": 0.19}
# bf16's top-2 log-probability margin below which a token is a near-tie: any change of the KV bits may flip it.
TIE_NATS = 0.25
# On SHORT_PROMPT bf16 is decided for its first 5 tokens (" Paris.\n\nThe"), then has a 0.125-nat tie
# (" answer" -3.301 vs " United" -3.426): the calibrated presets pick " United", uncalibrated ones " answer".
DECIDED_TOKENS = 5
SHORT_PROMPT = "The capital of France is"
# Issue 6's ">= 16 identical tokens" needs a prompt bf16 is sure about for that long: counting. Measured: bf16 decided
# for all 24 tokens (smallest top-2 margin 3.6 nats); 4bit and turboquant reproduce all 24.
# Greedy identity is asserted for the presets of >= 3.5 bits. 3bit (+16% perplexity on SmolLM2) is not that close:
# on the 2026-12-04 CI CPU (AVX-512 without AVX512-BF16/AMX: other bf16 rounding in the model) it wrote
# " 11, 12, 12, 13" and left the capital prompt's " Paris." at its 3rd token, where an AMX CPU had matched 24 tokens.
# Its quality is held by the perplexity bound instead.
GREEDY_PRESETS = ("4bit", "turboquant")
COUNTING_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
COUNTING_DECIDED = 24

pytestmark = pytest.mark.slow


def _engine(model_path: Path, kv_cache_dtype: str, preset: str | None = None, on: bool = True) -> Any:
    install()
    from vllm import LLM

    extra: dict[str, Any] = {}
    if preset is not None:
        extra["additional_config"] = {"turboquant": {"preset": preset}}
    if on:
        extra.update(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=CHUNK_BUDGET,
                     max_num_seqs=16)
    else:
        extra.update(enable_prefix_caching=False, enable_chunked_prefill=False,
                     max_num_batched_tokens=FAST_ENGINE_KWARGS["max_model_len"])
    return LLM(model=str(model_path), kv_cache_dtype=kv_cache_dtype, **FAST_ENGINE_KWARGS, **extra)


class Engines:
    """Engines built on first use and shared by every test of the module (each start costs ~5-10 s)."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.built: dict[tuple[str, str | None, bool], Any] = {}

    def get(self, kv_cache_dtype: str, preset: str | None = None, on: bool = True) -> Any:
        key = (kv_cache_dtype, preset, on)
        if key not in self.built:
            self.built[key] = _engine(self.model_path, *key)
        return self.built[key]

    def close(self) -> None:
        self.built.clear()
        gc.collect()


@pytest.fixture(scope="module")
def engines(model_path: Path) -> Iterator[Engines]:
    e = Engines(model_path)
    yield e
    e.close()


@pytest.fixture(scope="module")
def bf16(engines: Engines) -> Any:
    return engines.get("auto")


@pytest.fixture(scope="module", params=sorted(GOALS))
def tq(request: pytest.FixtureRequest, engines: Engines) -> tuple[str, Any]:
    return request.param, engines.get("turboquant", request.param)


@pytest.fixture(scope="module", params=GREEDY_PRESETS)
def tq_greedy(request: pytest.FixtureRequest, engines: Engines) -> tuple[str, Any]:
    return request.param, engines.get("turboquant", request.param)


def kv_tokens(llm: Any) -> int:
    """KV cache capacity in tokens as the engine reported it (blocks x block size)."""
    cache = llm.llm_engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks) * int(cache.block_size)


def greedy(llm: Any, prompts: list[str] | list[Any], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def perplexity(llm: Any, text: str, n_tokens: int) -> float:
    from vllm import SamplingParams, TokensPrompt

    ids = llm.get_tokenizer()(text)["input_ids"][:n_tokens]
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    logprobs = [step[tok].logprob for tok, step in zip(ids[1:], out.prompt_logprobs[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))


@pytest.fixture(scope="module")
def bf16_ppl(bf16: Any, lee_text: str) -> float:
    return perplexity(bf16, lee_text, PPL_TOKENS)


def test_capacity_grows_by_the_packed_ratio(bf16: Any, tq: tuple[str, Any]) -> None:
    """Same VLLM_CPU_KVCACHE_SPACE: tokens scale by bf16 bytes / our slot bytes (SmolLM2: 256 / slot)."""
    name, llm = tq
    expected = BF16_SLOT_BYTES / get_preset(name).slot_bytes(HEAD_DIM)
    ratio = kv_tokens(llm) / kv_tokens(bf16)
    assert ratio == pytest.approx(expected, rel=0.02), (name, kv_tokens(llm), kv_tokens(bf16))
    floors = {"3bit": 4.8, "turboquant": 4.2}  # issue 6: >= 4.8x at 3 bits, >= 4.2x at 3.5 bits
    assert ratio >= floors.get(name, 0.0), (name, ratio)


def test_perplexity_regression_bound(bf16_ppl: float, tq: tuple[str, Any], lee_text: str) -> None:
    """Perplexity through vLLM with TurboQuant KV stays within the regression bound (the goal is not met yet)."""
    name, llm = tq
    ppl = perplexity(llm, lee_text, PPL_TOKENS)
    delta = ppl / bf16_ppl - 1
    print(f"ppl[{name}] = {ppl:.3f} vs bf16 {bf16_ppl:.3f} ({delta:+.2%}; goal <= {GOALS[name]:+.0%})")
    assert delta <= PPL_REGRESSION_BOUND[name], f"regression (goal: <= {GOALS[name]:+.0%}): {name} {ppl} vs {bf16_ppl}"


def _bf16_greedy(llm: Any, prompt: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """bf16-KV greedy tokens with, per step, the log-probability margin of the chosen token over the runner-up."""
    from vllm import SamplingParams

    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    top2 = [sorted((lp.logprob for lp in step.values()), reverse=True)[:2] for step in out.logprobs]
    return list(out.token_ids), [a - b for a, b in top2]


@pytest.mark.parametrize("prompt,decided", [(SHORT_PROMPT, DECIDED_TOKENS), (COUNTING_PROMPT, COUNTING_DECIDED)],
                         ids=["capital", "counting"])
def test_greedy_matches_bf16_until_its_first_near_tie(bf16: Any, tq_greedy: tuple[str, Any], prompt: str,
                                                      decided: int) -> None:
    """Greedy output equals bf16-KV output on every token bf16 is decided about (margin >= TIE_NATS) up to its
    first near-tie. Issue 6 asks for >= 16 identical tokens: the counting prompt proves 24; the capital prompt only
    DECIDED_TOKENS (see there), as
    any KV perturbation may flip bf16's own tie (measured at the tie: 4bit and turboquant pick bf16's runner-up,
    3bit its third choice)."""
    name, llm = tq_greedy
    n = max(GREEDY_TOKENS, decided)
    ref, margins = _bf16_greedy(bf16, prompt, n)
    tie = next((i for i, m in enumerate(margins) if m < TIE_NATS), len(ref))
    assert tie >= decided, (tie, margins)  # bf16 itself: the prompt still tests what it was chosen for
    ours = greedy(llm, [prompt], n)[0]
    tok = llm.get_tokenizer()
    print(f"greedy[{name}]: {tok.decode(ours)!r} vs bf16 KV {tok.decode(ref)!r}; bf16 decided for {tie} tokens")
    assert ours[:tie] == ref[:tie], (name, tok.decode(ours), tok.decode(ref))


def test_prefix_caching_reproduces_cold_prefill(engines: Engines, lee_text: str) -> None:
    """Prompts sharing a 2-block prefix: the second round hits the prefix cache and must reproduce the cold run
    exactly (the cold 264-token prompt is prefilled in 64-token chunks, so its last chunk is the same 8 tokens the
    warm run computes on top of the cached blocks). The text is taken past the tokens the perplexity test fed the
    same engine, so the first round starts cold."""
    from vllm import SamplingParams, TokensPrompt

    on = engines.get("turboquant", "turboquant")
    ids = on.get_tokenizer()(lee_text)["input_ids"]
    prefix = ids[1000:1000 + 2 * 128]  # CPU block size 128: two full blocks to hit
    prompts = [TokensPrompt(prompt_token_ids=prefix + ids[2000 + 8 * i:2008 + 8 * i]) for i in range(2)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    cold = on.generate(prompts, params, use_tqdm=False)  # fills the cache, prefilled in chunks
    warm = on.generate(prompts, params, use_tqdm=False)  # both requests reuse the cached prefix blocks
    assert cold[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in warm] == [len(prefix)] * 2
    assert [list(o.outputs[0].token_ids) for o in warm] == [list(o.outputs[0].token_ids) for o in cold]


def test_chunked_prefill_matches_unchunked_within_noise(engines: Engines, lee_text: str) -> None:
    """Chunked prefill (64-token chunks attending over the compressed cache of earlier chunks) vs one-shot prefill.
    bf16 KV gives bit-identical greedy tokens here; with TurboQuant the K/V of a chunked run differ in the last
    bf16 bits (other matmul shapes), which can flip codes, so tokens may diverge: compare perplexity instead
    (measured: 35.10 chunked vs 35.66 one-shot over these 400 tokens, 1.6%)."""
    on, off = engines.get("turboquant", "turboquant"), engines.get("turboquant", "turboquant", on=False)
    tok = on.get_tokenizer()
    text = tok.decode(tok(lee_text)["input_ids"][3000:3400])  # not cached by any other test
    chunked, whole = perplexity(on, text, 400), perplexity(off, text, 400)
    assert abs(chunked / whole - 1) <= 0.03, (chunked, whole)


def test_fp16_model_with_turboquant_matches_its_fp16_kv_run(model_path: Path, lee_text: str) -> None:
    """An fp16 model (the kernels and the reference take fp16 queries and write fp16 outputs): the same bounds as
    the bf16 model's, against the same model with fp16 KV (measured on 512 tokens: 25.41 -> 26.70, +5.1%; the
    counting prompt's 24 tokens identical)."""
    install()
    from vllm import LLM

    fp16 = {**FAST_ENGINE_KWARGS, "dtype": "float16"}
    ref = LLM(model=str(model_path), kv_cache_dtype="auto", **fp16)
    ref_ppl, ref_greedy = perplexity(ref, lee_text, PPL_TOKENS), greedy(ref, [COUNTING_PROMPT], COUNTING_DECIDED)
    del ref
    gc.collect()
    llm = LLM(model=str(model_path), kv_cache_dtype="turboquant", **fp16)
    assert str(llm.llm_engine.vllm_config.model_config.dtype) == "torch.float16"
    ppl = perplexity(llm, lee_text, PPL_TOKENS)
    print(f"fp16 model: ppl {ppl:.3f} vs fp16 KV {ref_ppl:.3f} ({ppl / ref_ppl - 1:+.2%})")
    assert ppl / ref_ppl - 1 <= PPL_REGRESSION_BOUND["turboquant"]
    assert greedy(llm, [COUNTING_PROMPT], COUNTING_DECIDED) == ref_greedy
