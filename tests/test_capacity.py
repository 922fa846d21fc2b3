"""``vllm-gds capacity``: the planner against vLLM's measured H100 KV-cache sizes, real weights, its JSON, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_gds_plugin import capacity as cap
from vllm_gds_plugin.capacity_commands import parse_memory, selected_row_name
from vllm_gds_plugin.cli import main
from vllm_gds_plugin.kvcache.presets import get_preset, preset_names

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "public_configs"
LLAMA_8B = CONFIGS / "llama-3.1-8b.json"


def h100_plan() -> cap.Plan:
    c = cap.H100_CALIBRATION
    return cap.plan(cap.load_shape(LLAMA_8B), cap.PlanRequest(
        gpu_memory_bytes=c["gpu_memory_bytes"], tensor_parallel_size=c["tensor_parallel_size"],
        gpu_memory_utilization=c["gpu_memory_utilization"]))


@pytest.mark.parametrize("kv_dtype", list(cap.H100_CALIBRATION["kv_tokens"]))
def test_reproduces_h100_kv_tokens_within_3pct(kv_dtype: str) -> None:
    measured = cap.H100_CALIBRATION["kv_tokens"][kv_dtype]
    predicted = h100_plan().row(kv_dtype).tokens
    assert abs(predicted / measured - 1) <= 0.03, (kv_dtype, predicted, measured)


def test_fixed_overhead_is_what_the_bf16_measurement_implies() -> None:
    # Re-derive the calibration: whatever the bf16 pool was, it lies within one 16-token block of the measurement.
    p = h100_plan()
    c = cap.H100_CALIBRATION
    budget = int(c["gpu_memory_bytes"] * c["gpu_memory_utilization"])
    bpt = p.row("auto").option.bytes_per_token
    implied_max = budget - p.weights.total - p.activation_bytes - c["kv_tokens"]["auto"] * bpt
    assert implied_max - cap.BLOCK_SIZE * bpt < cap.NON_KV_FIXED_BYTES <= implied_max


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_native_turboquant_slot_bytes_follow_vllm(head_dim: int) -> None:
    from vllm.model_executor.layers.quantization.turboquant.config import TQ_PRESETS, TurboQuantConfig

    assert set(TQ_PRESETS) == set(cap.NATIVE_TQ_PRESETS)
    for name, (kb, vb) in cap.NATIVE_TQ_PRESETS.items():
        expected = TurboQuantConfig.from_cache_dtype(name, head_dim).slot_size_aligned
        assert cap.native_tq_slot_bytes(kb, vb, head_dim) == expected, name


def test_every_plugin_preset_has_a_row_sized_by_slot_bytes() -> None:
    p = h100_plan()
    layers, kv_heads = p.shape.num_layers, p.parallel.kv_heads
    for name in preset_names():
        row = p.row(selected_row_name(f"turboquant:{name}"))
        assert row.option.bytes_per_token == layers * kv_heads * get_preset(name).slot_bytes(p.shape.head_dim)
    assert p.row(selected_row_name("turboquant")).option.select == "--kv-cache-dtype turboquant"


def test_weights_equal_the_real_checkpoint_bytes(model_path: Path) -> None:
    # SmolLM2: tied embeddings, vocab a multiple of 64 (no padding): every parameter is in the safetensors.
    from safetensors import safe_open

    nbytes = 0
    for f in model_path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                n = 1
                for s in t.get_shape():
                    n *= s
                nbytes += n * 2  # bf16 checkpoint
    shape = cap.load_shape(model_path)
    w = cap.weights_per_gpu(shape, cap.Parallel.of(shape, 1), "bf16")
    assert w.total - w.rotary_cache == nbytes


def test_tensor_parallel_splits_and_fp8() -> None:
    shape = cap.load_shape(CONFIGS / "llama-3.1-405b.json")
    bf16_1 = cap.weights_per_gpu(shape, cap.Parallel.of(shape, 1), "bf16")
    fp8_8 = cap.weights_per_gpu(shape, cap.Parallel.of(shape, 8), "fp8")
    assert 405e9 < (bf16_1.projections + bf16_1.embeddings + bf16_1.replicated) / 2 < 406e9  # "405B" parameters
    assert fp8_8.projections * 8 * 2 == bf16_1.projections  # FP8 halves, TP=8 splits exactly
    assert fp8_8.embeddings * 8 == bf16_1.embeddings
    assert fp8_8.replicated == bf16_1.replicated
    block = cap.weights_per_gpu(shape, cap.Parallel.of(shape, 8), "fp8", "block")
    assert block.scales > fp8_8.scales > 0


def test_kv_head_replication_when_tp_exceeds_kv_heads() -> None:
    shape = cap.load_shape(LLAMA_8B)  # 8 KV heads
    par = cap.Parallel.of(shape, 16)
    assert (par.kv_heads, par.kv_replicas, par.heads) == (1, 2, 2)
    p = cap.plan(shape, cap.PlanRequest(gpu_memory_bytes=cap.GPU_MEMORY["H100"], tensor_parallel_size=16))
    assert p.row("auto").option.bytes_per_token == 32 * 1 * 2 * 128 * 2


def test_json_output_schema(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["capacity", "--model", str(LLAMA_8B), "--gpu-memory", "80GiB", "-tp", "2",
               "--kv-cache-dtype", "turboquant:3bit", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["selected"] == "turboquant:k3v3"
    assert doc["request"]["gpu_memory_bytes"] == 80 * 2**30 and doc["request"]["tensor_parallel_size"] == 2
    assert doc["budget_bytes"] - doc["weights_bytes"]["total"] - doc["overhead_bytes"] == doc["kv_pool_bytes"]
    for key in ("model", "per_gpu", "activation_bytes", "max_model_len"):
        assert key in doc
    families = {r["family"] for r in doc["kv_cache"]}
    assert families == {"vllm", "plugin", "vllm-native"}
    for r in doc["kv_cache"]:
        assert set(r) == {"name", "family", "select", "bits", "bytes_per_token", "note", "tokens",
                          "ratio_vs_auto", "sequences_at_max_model_len"}
        assert r["tokens"] % cap.BLOCK_SIZE == 0 and r["tokens"] * r["bytes_per_token"] <= doc["kv_pool_bytes"]


def test_human_table_marks_the_selected_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", "--model", str(LLAMA_8B), "--gpu-memory", "H100", "--kv-cache-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    starred = [line for line in out.splitlines() if line.startswith("*")]
    assert len(starred) == 1 and starred[0].split()[1] == "fp8"
    assert "889,072" in starred[0]


def test_memory_sizes() -> None:
    assert parse_memory("80GiB") == parse_memory("80G") == 80 * 2**30
    assert parse_memory("141GB") == 141 * 10**9
    assert parse_memory("81559MiB") == parse_memory("h100") == cap.GPU_MEMORY["H100"]


@pytest.mark.parametrize("config, args, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, [], "GPT2LMHeadModel"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}, [], "lacks intermediate_size"),
    (None, ["-tp", "3"], "num_attention_heads (32) is not divisible by --tensor-parallel-size 3"),
    ({"num_key_value_heads": 3, "num_attention_heads": 12}, ["-tp", "4"],
     "larger than num_key_value_heads (3) but not a multiple of it: vLLM replicates each KV head"),
    ({"num_key_value_heads": 12, "num_attention_heads": 24}, ["-tp", "8"],
     "num_key_value_heads (12) is not divisible"),
    (None, ["--gpu-memory", "16GiB"], "no memory left for the KV cache"),
    (None, ["--kv-cache-dtype", "int3"], "no KV dtype 'int3'"),
    (None, ["--kv-cache-dtype", "turboquant:k9v9"], "unknown TurboQuant preset 'k9v9'"),
    (None, ["--gpu-memory-utilization", "1.5"], "must be in (0, 1]"),
])
def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict | None, args: list[str],
                      message: str) -> None:
    cfg = json.loads(LLAMA_8B.read_text())
    if config is not None:
        cfg = config if "architectures" in config else cfg | config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    argv = ["capacity", "--model", str(tmp_path), "--gpu-memory", "H100", *args]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("vllm-gds capacity: error: ") and message in err, err


def test_missing_and_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(cap.CapacityError, match="no such file"):
        cap.load_shape(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(cap.CapacityError, match="not a readable JSON config"):
        cap.load_shape(tmp_path)
