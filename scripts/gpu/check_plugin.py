"""GPU proof for the foundation issue: vLLM 0.26 (CUDA) discovers the plugin, register() runs in every process
vLLM starts, and a greedy generate call on the embedded real model works. Prints a JSON summary last."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
import tempfile

trace = os.path.join(tempfile.mkdtemp(), "register.tsv")
os.environ["VLLM_GDS_TRACE_REGISTER"] = trace

from vllm import LLM, SamplingParams  # noqa: E402

import vllm_gds_plugin  # noqa: E402
from vllm_gds_plugin.assets import model_dir  # noqa: E402

eps = [ep.value for ep in md.entry_points(group="vllm.general_plugins")]
llm = LLM(model=str(model_dir()), dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3)
prompts = ["The capital of France is", "One, two, three, four,", "The opposite of hot is"]
outs = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]
pids = sorted({line.split("\t")[0] for line in open(trace)})
import torch, vllm  # noqa: E402,E401
summary = {"vllm": vllm.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name(0),
           "plugin": vllm_gds_plugin.__version__, "entry_points": eps, "register_pids": pids,
           "main_pid": str(os.getpid()), "outputs": dict(zip(prompts, outs))}
print(json.dumps(summary, indent=1))
ok = "vllm_gds_plugin:register" in eps and len(pids) >= 2 and "Paris" in outs[0]
print("FOUNDATION_GPU_CHECK", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
