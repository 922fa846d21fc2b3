"""Hostile-input generators and targets for everything that parses shard/checkpoint bytes from disk.

Shared by tests/test_reliability_fuzz.py (a few hundred cases) and benchmarks/fuzz.py (>= 10,000 cases).

A *target* feeds one generated case through real plugin code and returns the outcome: ``"ok"`` or the name of
the plugin exception that refused it. Anything else escaping a target (IndexError, KeyError, TypeError,
RecursionError, MemoryError, a safetensors Rust error, ...) is a bug the caller reports. Refusals must name the
file they are about.

The corpus is a real (tiny, synthetic-weight) shard output written by the plugin's own writer and manifest code:
two tensor-parallel ranks, two part files in rank 0, every dtype family a shard holds.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

from vllm_gds_plugin.kvcache.calibration import TurboQuantCalibration, TurboQuantCalibrationError
from vllm_gds_plugin.loading.loader import LoadOptions, ShardLoadError, load_rank
from vllm_gds_plugin.loading.manifest import (
    CreatedBy, Manifest, ManifestError, ModelInfo, Parallel, Quantization, RankEntry, Source, SourceFile,
    config_digest, rank_dir,
)
from vllm_gds_plugin.loading.shard_check import check_file
from vllm_gds_plugin.loading.sharder import verify
from vllm_gds_plugin.loading.source import ShardError, SourceCheckpoint
from vllm_gds_plugin.loading.st_header import HeaderError, parse_header
from vllm_gds_plugin.loading.writer import write_aligned_safetensors

# Per rank: (name, dtype, shape). Sizes chosen so tensors straddle 4 KiB pages and padding tensors appear.
RANK_TENSORS: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
    ("model.embed_tokens.weight", torch.bfloat16, (48, 40)),
    ("model.layers.0.qkv_proj.weight", torch.float8_e4m3fn, (96, 40)),
    ("model.layers.0.qkv_proj.weight_scale", torch.float32, (3,)),
    ("model.layers.0.input_layernorm.weight", torch.bfloat16, (40,)),
    ("model.layers.0.positions", torch.int64, (5,)),
    ("model.norm.weight", torch.float32, (40,)),
]
PARTS = {0: [RANK_TENSORS[:3], RANK_TENSORS[3:]], 1: [RANK_TENSORS]}  # tp rank -> tensors per part file
CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 40, "num_hidden_layers": 1}
LOAD_OPTS = LoadOptions(io="buffered", threads=2, chunk_mib=1, pinned_mib=2)
# Every host read path parses the same headers but reads bytes differently (pread ring vs zero-copy mmap windows,
# digests over staged vs mapped bytes): hostile shard files go through each.
LOAD_VARIANTS = [LOAD_OPTS, LoadOptions(io="mapped", threads=2, chunk_mib=1, pinned_mib=2, verify=True)]
CALIBRATION_SHAPE = (2, 3, 16)  # [layers, kv_heads, head_dim] of the corpus' TurboQuant calibration file


def _values(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)


def build_corpus(out: Path) -> Path:
    """Write the two-rank shard output ``out`` with the plugin's writer + manifest; return it."""
    gen = torch.Generator().manual_seed(0)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(CONFIG))
    ranks = {}
    for tp, parts in PARTS.items():
        (out / rank_dir(0, tp)).mkdir()
        files = []
        for k, part in enumerate(parts):
            rel = f"{rank_dir(0, tp)}/part-{k}.safetensors"
            tensors = [(n, _values(d, s, gen)) for n, d, s in part]
            files.append(write_aligned_safetensors(out / rel, tensors, rel))
        ranks[f"pp0-tp{tp}"] = RankEntry(tuple(files))
    Manifest(CreatedBy("0", "0.32.0", "2.13.0"), Source("/src", {"config.json": SourceFile(10, "0" * 64)}),
             ModelInfo("LlamaForCausalLM", config_digest(CONFIG), "bfloat16"), Parallel(len(PARTS), 1),
             Quantization("fp8", "per-tensor"), ranks).save(out)
    mean = torch.randn(CALIBRATION_SHAPE, generator=gen)
    TurboQuantCalibration(mean, torch.ones(CALIBRATION_SHAPE), torch.zeros(CALIBRATION_SHAPE),
                          torch.ones(CALIBRATION_SHAPE), 1000, "fuzz corpus").save(out / "calibration.tqcal")
    return out


def rank_dest() -> dict[str, torch.Tensor]:
    """A rank-sized 'model': one destination tensor per shard tensor."""
    return {n: torch.empty(s, dtype=d) for n, d, s in RANK_TENSORS}


# ---------------------------------------------------------------------------------------------------------------
# Strategies


JSON_ATTACKS = st.sampled_from([
    None, True, False, -1, 0, 1, 3, 4095, 4096, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63), 1.5,
    float("nan"), float("inf"), float("-inf"), "", "\ud800", "a\x00b", "../etc/passwd", "/etc/passwd",
    "rank-pp0-tp1/part-0.safetensors", "rank-pp0-tp0", "bfloat16", "float8_e4m3fn", "F8_E4M3", "BF16", "U8",
    "pp0-tp0", "x" * 300, [], {}, [0, 2**64], [10**6] * 8,
])
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), JSON_ATTACKS)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                              max_size=3),
                           max_leaves=6)


@st.composite
def mutated(draw: st.DrawFn, doc: Any, max_mutations: int = 3) -> Any:
    """``doc`` (a JSON tree) with 1..max_mutations random edits: replace, delete, insert, duplicate or swap
    a node somewhere in the tree (chosen by a random walk)."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, max_mutations))):
        node = doc
        while True:  # walk down to a container
            kids = [k for k, v in _items(node) if isinstance(v, (dict, list)) and v]
            if not kids or draw(st.integers(0, 3)) == 0:
                break
            node = node[draw(st.sampled_from(kids))]
        keys = [k for k, _ in _items(node)]
        action = draw(st.sampled_from(["replace", "delete", "insert", "duplicate", "swap"]))
        if action == "replace" and keys:
            node[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
        elif action == "delete" and keys:
            del node[draw(st.sampled_from(keys))]
        elif action == "insert":
            if isinstance(node, dict):
                node[draw(st.text(max_size=10))] = draw(JSON_VALUES)
            else:
                node.insert(draw(st.integers(0, len(node))), draw(JSON_VALUES))
        elif action == "duplicate" and keys:
            k = draw(st.sampled_from(keys))
            if isinstance(node, dict):
                node[k + "_"] = copy.deepcopy(node[k])
            else:
                node.append(copy.deepcopy(node[k]))
        elif action == "swap" and len(keys) >= 2:
            a, b = draw(st.permutations(keys))[:2]
            node[a], node[b] = node[b], node[a]
    return doc


def _items(node: Any) -> list[tuple[Any, Any]]:
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, list):
        return list(enumerate(node))
    return []


@st.composite
def byte_mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few flipped, inserted or deleted bytes, or cut short."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(0, len(b) - 1)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip" and b:
            b[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and b:
            del b[i]
        elif op == "truncate":
            del b[i:]
    return bytes(b)


def deep_nesting(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# ---------------------------------------------------------------------------------------------------------------
# Targets


@dataclass
class Scratch:
    """A per-process copy of the corpus the targets may damage (the pristine corpus stays intact)."""

    pristine: Path
    root: Path

    @classmethod
    def make(cls, base: Path) -> Scratch:
        pristine = build_corpus(base / "pristine")
        return cls(pristine, base / "scratch")

    def fresh(self) -> Path:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.copytree(self.pristine, self.root)
        return self.root

    def manifest_doc(self) -> dict:
        return json.loads((self.pristine / "manifest.json").read_text())

    def part(self, tp: int = 0, k: int = 0) -> str:
        return f"{rank_dir(0, tp)}/part-{k}.safetensors"


def _names_file(e: Exception, *paths: Path) -> None:
    if not any(str(p) in str(e) for p in paths):
        raise AssertionError(f"{type(e).__name__} does not name the file ({[str(p) for p in paths]}): {e}")


def load_everything(out: Path, opts: LoadOptions = LOAD_OPTS) -> str:
    """What a user can do with ``out``: inspect (load), verify, and load every rank into a rank-sized model."""
    m = Manifest.load(out)
    verify(out)
    for tp in range(m.parallel.tensor_parallel_size):
        load_rank(m, 0, tp, rank_dest(), opts)
    return "ok"


def refused(fn: Callable[[], str], allowed: tuple[type[Exception], ...], *paths: Path) -> str:
    """Run ``fn``; an allowed refusal must name one of ``paths``; anything else propagates (a bug)."""
    try:
        return fn()
    except allowed as e:
        _names_file(e, *paths)
        return type(e).__name__


def manifest_bytes_target(scratch: Scratch, text: bytes) -> str:
    """Arbitrary manifest.json content (the shard files intact)."""
    out = scratch.fresh()
    (out / "manifest.json").write_bytes(text)
    return refused(lambda: load_everything(out), (ManifestError, ShardLoadError), out)


def manifest_doc_target(scratch: Scratch, doc: Any) -> str:
    return manifest_bytes_target(scratch, json.dumps(doc, ensure_ascii=True, allow_nan=True).encode())


def header_bytes(path: Path) -> tuple[bytes, dict, bytes]:
    """(8-byte length prefix, header JSON object, the rest) of a safetensors file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[:8], json.loads(data[8:8 + n]), data[8 + n:]


def encode_header(doc: Any, original_len: int, rest: bytes, non_utf8_name: bool = False) -> bytes:
    """Serialize ``doc`` padded with spaces to the original header length when it fits (so the file keeps its
    size and the header, not the size check, is what gets tested); optionally corrupt a name to invalid UTF-8."""
    text = json.dumps(doc, ensure_ascii=True, allow_nan=True, separators=(",", ":")).encode()
    if non_utf8_name and b'"model.' in text:
        text = text.replace(b'"model.', b'"mo\xff\xfedel.', 1)
    text += b" " * max(0, original_len - len(text))
    return struct.pack("<Q", len(text)) + text + rest


def shard_file_target(scratch: Scratch, data: bytes, tp: int = 0, k: int = 0, opts: LoadOptions = LOAD_OPTS) -> str:
    """Replace one shard file with ``data``; the loader's checks, verify and the header parser must refuse
    it cleanly (or load it through ``opts``' read path, when the bytes still describe the same tensors)."""
    out = scratch.fresh()
    rel = scratch.part(tp, k)
    (out / rel).write_bytes(data)
    m = Manifest.load(out)
    entry = m.rank(0, tp).files[k]
    sized = replace(entry, size=len(data))  # as if the manifest agreed on the size: reach the header check

    def run() -> str:
        check_file(out, sized, f"pp0-tp{tp}")
        return load_everything(out, opts)

    outcome = refused(run, (ShardLoadError,), out / rel)
    try:
        parse_header(data, len(data))
    except HeaderError:
        pass
    return outcome


def source_target(scratch: Scratch, data: bytes) -> str:
    """A source HF checkpoint whose only weight file is ``data``: the sharder's source reader must refuse it
    with ShardError (never reach safetensors' Rust parser with a file it would choke on)."""
    src = scratch.fresh() / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CONFIG))
    (src / "model.safetensors").write_bytes(data)

    def run() -> str:
        ckpt = SourceCheckpoint.open(src)
        for _ in ckpt.tensors():
            pass
        return "ok"

    return refused(run, (ShardError,), src / "model.safetensors")


def calibration_target(scratch: Scratch, data: bytes) -> str:
    """A TurboQuant calibration file (safetensors bytes under a .tqcal name, read when an engine starts) holding
    ``data``: TurboQuantCalibration.load must refuse it with TurboQuantCalibrationError or load a valid one."""
    path = scratch.fresh() / "calibration.tqcal"
    path.write_bytes(data)

    def run() -> str:
        cal = TurboQuantCalibration.load(path)
        for i in range(cal.shape[0]):
            cal.layer(i)
        return "ok"

    return refused(run, (TurboQuantCalibrationError,), path)


@st.composite
def header_attacks(draw: st.DrawFn, prefix: bytes, header: dict, rest: bytes) -> bytes:
    """The attacks the issue names, aimed at one real tensor entry of a real shard header."""
    (n,) = struct.unpack("<Q", prefix)
    doc = copy.deepcopy(header)
    names = sorted(k for k in doc if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = doc[name]
    kind = draw(st.sampled_from(["lying_offset", "huge_shape", "overlap", "wrong_dtype", "non_utf8_name",
                                 "truncated_header", "lying_length", "generic", "bytes"]))
    if kind == "lying_offset":
        i = draw(st.integers(0, 1))
        entry["data_offsets"][i] += draw(st.sampled_from([-4096, -1, 1, 4096, 2**40, 2**64]))
    elif kind == "huge_shape":
        entry["shape"] = draw(st.lists(st.sampled_from([2**31, 2**62, 2**64, 10**12, 0]), min_size=1, max_size=4))
    elif kind == "overlap":
        other = doc[draw(st.sampled_from(names))]
        entry["data_offsets"] = list(other["data_offsets"])
    elif kind == "wrong_dtype":
        entry["dtype"] = draw(st.sampled_from(["F32", "BF16", "F8_E4M3", "I64", "U8", "BOOL", "F4", "bf16", "", 7]))
    elif kind == "non_utf8_name":
        return encode_header(doc, n, rest, non_utf8_name=True)
    elif kind == "truncated_header":
        whole = prefix + json.dumps(header).encode().ljust(n) + rest
        return whole[:draw(st.integers(0, 8 + n))]
    elif kind == "lying_length":
        fake = draw(st.sampled_from([0, 1, n - 1, n + 1, len(rest) + n, 2**32, 2**63, 2**64 - 1]))
        return struct.pack("<Q", max(0, min(fake, 2**64 - 1))) + prefix[8:] + json.dumps(header).encode().ljust(n) + rest
    elif kind == "generic":
        doc = draw(mutated(header))
    else:
        return draw(byte_mutated(prefix + json.dumps(header).encode().ljust(n) + rest[:8192]))
    return encode_header(doc, n, rest)


def raw_header_target(data: bytes, file_size: int) -> str:
    """The bare parser: random bytes must give a Header or HeaderError, nothing else."""
    try:
        parse_header(data, file_size)
        return "ok"
    except HeaderError as e:
        return type(e).__name__


def swap_files(doc: dict, a: tuple[str, int], b: tuple[str, int]) -> dict:
    """Exchange two file entries between (or within) ranks' file lists."""
    doc = copy.deepcopy(doc)
    fa, fb = doc["ranks"][a[0]]["files"], doc["ranks"][b[0]]["files"]
    fa[a[1]], fb[b[1]] = fb[b[1]], fa[a[1]]
    return doc


@st.composite
def file_list_attacks(draw: st.DrawFn, doc: dict) -> dict:
    """Shard file lists: drop, duplicate, swap between ranks, point at other or missing files."""
    doc = copy.deepcopy(doc)
    key = draw(st.sampled_from(sorted(doc["ranks"])))
    files = doc["ranks"][key]["files"]
    kind = draw(st.sampled_from(["drop", "duplicate", "swap_ranks", "repath", "empty", "reorder"]))
    if kind == "drop" and len(files) > 1:
        files.pop(draw(st.integers(0, len(files) - 1)))
    elif kind == "duplicate":
        files.append(copy.deepcopy(files[0]))
    elif kind == "swap_ranks":
        other = draw(st.sampled_from(sorted(doc["ranks"])))
        return swap_files(doc, (key, draw(st.integers(0, len(files) - 1))),
                          (other, draw(st.integers(0, len(doc["ranks"][other]["files"]) - 1))))
    elif kind == "repath":
        f = files[draw(st.integers(0, len(files) - 1))]
        f["path"] = draw(st.sampled_from(["rank-pp0-tp1/part-0.safetensors", "rank-pp0-tp0/part-1.safetensors",
                                          "rank-pp0-tp0/part-9.safetensors", "rank-pp0-tp0", "config.json",
                                          "manifest.json", "rank-pp0-tp0/../config.json", "./x", "a//b"]))
    elif kind == "empty":
        files.clear()
    else:
        files.reverse()
    return doc
