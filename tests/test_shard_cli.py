"""`vllm-gds shard | inspect | verify` through the real CLI on the real model: round trip, corruption detection,
and bad input refused with a clear message and no output folder that looks valid."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kill_points import ctrl_c_raises
from shard_fixtures import flip_byte, import_vllm_before_cli
from vllm_gds_plugin.cli import main
from vllm_gds_plugin.kvcache.calibration import CALIBRATION_FILE, find_calibration
from vllm_gds_plugin.kvcache.calibration_lookup import candidates
from vllm_gds_plugin.loading.manifest import MANIFEST_NAME, Manifest

pytestmark = pytest.mark.slow


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*")), "staging folder left behind"


@pytest.fixture(scope="module", autouse=True)
def _vllm_imported() -> None:
    import_vllm_before_cli()


@pytest.fixture
def sharded(sharded_bf16_tp3: Path) -> Path:
    return sharded_bf16_tp3  # `vllm-gds shard -tp 3 --quantization none --max-file-size 64MiB` (shard_fixtures.py)


def test_inspect_and_verify_fresh_output(sharded: Path, capsys) -> None:
    m = Manifest.load(sharded)
    assert len(m.rank(0, 0).files) > 1  # --max-file-size split the rank into parts
    assert (sharded / "tokenizer.json").exists() and (sharded / "config.json").exists()
    assert main(["inspect", str(sharded)]) == 0
    assert "rank pp0-tp0" in capsys.readouterr().out
    assert main(["verify", str(sharded)]) == 0
    assert "OK" in capsys.readouterr().out


def test_turboquant_calibration_travels_with_the_shards(model_path: Path, sharded: Path, tmp_path: Path,
                                                        capsys) -> None:
    """SRC's TurboQuant calibration (assets.model_dir() calibrates the embedded model) is copied into OUT, where
    the engine's automatic lookup finds it first; the manifest's source fingerprint holds its sha256 and verify
    checks the copy against it."""
    src_cal = model_path / CALIBRATION_FILE
    assert src_cal.is_file()
    assert (sharded / CALIBRATION_FILE).read_bytes() == src_cal.read_bytes()
    m = Manifest.load(sharded)
    assert m.source.files[CALIBRATION_FILE].sha256 == hashlib.sha256(src_cal.read_bytes()).hexdigest()
    assert candidates(str(sharded))[0] == sharded / CALIBRATION_FILE
    got, want = find_calibration(sharded), find_calibration(model_path)
    assert torch.equal(got.key_mean, want.key_mean) and got.tokens == want.tokens > 0

    out = tmp_path / "copy"
    shutil.copytree(sharded, out)
    with open(out / CALIBRATION_FILE, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0x20]))
    assert main(["verify", str(out)]) == 1
    assert f"MISMATCH {CALIBRATION_FILE}: sha256" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_verify_detects_damage(sharded: Path, tmp_path: Path, damage: str, capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(sharded, out)
    f = Manifest.load(out).rank(0, 0).files[-1]
    path = out / f.path
    if damage == "flip":
        flip_byte(path, f.tensors[0].offset + 7, 0x01)
    else:
        os.truncate(path, f.size - 4096)
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"MISMATCH {f.path}" in printed
    if damage == "flip":  # both the file's digest and the tensor's checksum see it
        assert f"MISMATCH {f.path}: xxh3_128" in printed
        assert f"MISMATCH {f.path}: tensor {f.tensors[0].name!r}: checksum" in printed


def test_jobs_split_the_ranks_over_processes_with_identical_files(model_path: Path, sharded: Path, tmp_path: Path,
                                                                   ) -> None:
    """--jobs 2: two worker processes make ranks {0, 2} and {1} (each its own pass over the source); every file
    is byte-identical (same xxh3-128) to the one-process output of the same command."""
    out = tmp_path / "jobs2"
    assert main(["shard", str(model_path), str(out), "-tp", "3", "--quantization", "none",
                 "--max-file-size", "64MiB", "--jobs", "2"]) == 0
    got, want = Manifest.load(out), Manifest.load(sharded)
    assert {k: [(f.path, f.size, f.xxh3_128, f.tensors) for f in r.files] for k, r in got.ranks.items()} == \
        {k: [(f.path, f.size, f.xxh3_128, f.tensors) for f in r.files] for k, r in want.ranks.items()}


def test_refuses_occupied_out_unless_overwrite(model_path: Path, sharded: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's files")
    assert main(["shard", str(model_path), str(other), "--quantization", "none"]) == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert (other / "notes.txt").exists()
    assert main(["shard", str(model_path), str(sharded), "--quantization", "none"]) == 1
    assert "holds a vllm-gds shard output" in capsys.readouterr().err


def test_refuses_tp_not_dividing_heads(model_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["shard", str(model_path), str(out), "-tp", "2", "--quantization", "none"]) == 1
    assert "attention heads (9) must be divisible by tensor parallel size (2)" in capsys.readouterr().err
    _no_leftovers(out)


def _copy_source(model_path: Path, dst: Path) -> Path:
    shutil.copytree(model_path, dst)
    return dst


def test_refuses_bad_sources(model_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    trunc = _copy_source(model_path, tmp_path / "trunc")
    weights = next(trunc.glob("*.safetensors"))
    os.truncate(weights, weights.stat().st_size - 1000)
    assert main(["shard", str(trunc), str(out)]) == 1
    assert f"{weights}: truncated" in capsys.readouterr().err

    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(model_path / "config.json", missing / "config.json")
    assert main(["shard", str(missing), str(out)]) == 1
    assert "no *.safetensors weight files" in capsys.readouterr().err

    arch = _copy_source(model_path, tmp_path / "arch")
    cfg = (arch / "config.json").read_text().replace('"LlamaForCausalLM"', '"NoSuchModelForCausalLM"')
    (arch / "config.json").write_text(cfg)
    assert main(["shard", str(arch), str(out)]) == 1
    assert "NoSuchModelForCausalLM" in capsys.readouterr().err

    assert main(["shard", str(model_path), str(out), "--fp8-scheme", "per-channel"]) == 1
    assert "per-channel" in capsys.readouterr().err
    _no_leftovers(out)


def test_ctrl_c_leaves_nothing(model_path: Path, tmp_path: Path, capsys) -> None:
    """A real SIGINT (what Ctrl-C sends) to this process while rank 0's part file is being written: the CLI
    reports the interruption, exits 130, and leaves neither OUT nor its staging folder."""
    out = tmp_path / "out"
    done, fired = threading.Event(), []

    def interrupt_mid_write() -> None:
        while not done.wait(0.005):
            if list(tmp_path.glob("out.tmp-*/rank-pp0-tp0/part-*.safetensors")):
                fired.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt in the main thread
                return

    watcher = threading.Thread(target=interrupt_mid_write, daemon=True)
    with ctrl_c_raises():
        watcher.start()
        try:
            code = main(["shard", str(model_path), str(out), "-tp", "3"])
        finally:
            done.set()
            watcher.join()
    assert fired, "the run finished before a part file appeared"
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    _no_leftovers(out)
    assert not (out / MANIFEST_NAME).exists()


def test_failed_write_leaves_nothing(model_path: Path, tmp_path: Path) -> None:
    """A write that fails mid-way (the process may not grow a file past 16 MiB: EFBIG, as a full disk gives
    ENOSPC) in a real `vllm-gds shard` process: a clear error, a non-zero exit, neither OUT nor its staging
    folder left. The 32 MiB parts are written by several I/O threads at once (the default)."""
    out = tmp_path / "out"

    def small_files() -> None:  # in the child only; Python ignores SIGXFSZ, so the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "vllm_gds_plugin.cli", "shard", str(model_path), str(out),
                           "--quantization", "none", "--max-file-size", "32MiB"],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{out}: write failed ([Errno {errno.EFBIG}] File too large" in proc.stderr
    assert "nothing was left behind" in proc.stderr
    _no_leftovers(out)
