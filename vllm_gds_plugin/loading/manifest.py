"""The manifest of a pre-sharded output folder (``vllm-gds shard`` writes it, ``--load-format gds-sharded`` reads it).

Layout of an output folder ``OUT``::

    OUT/config.json, generation_config.json, tokenizer files
    OUT/rank-pp{p}-tp{t}/part-{k}.safetensors   # only that rank's tensors, data 4 KiB aligned
    OUT/manifest.json                          # written last: its presence means the folder is complete

Every tensor entry is one vLLM parameter (or buffer filled by weight loading) of that rank's model, holding
the bytes vLLM's own weight loading leaves in it *before* ``process_weights_after_loading``.

API (all a reader needs)::

    m = Manifest.load(OUT)                 # folder or manifest.json path; strict, raises ManifestError
    for f in m.rank(pp=0, tp=1).files:     # FileEntry(path, size, xxh3_128, tensors)
        for t in f.tensors: ...            # TensorEntry(name, dtype, shape, offset, nbytes, checksum)
    xxh3_128_file(OUT / f.path)            # hex digest to compare with f.xxh3_128

Format versions: 2 adds every tensor's ``checksum`` (kernels/checksum/naive.py: what the loader verifies on the
GPU, over the parameters themselves); version 1 manifests (no checksums) are still read, and verified through
the files' xxh3-128 alone.

This module imports neither torch nor vLLM: dtypes are strings (torch names without ``torch.``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import xxhash

from vllm_gds_plugin.assets import sha256_file  # the source fingerprint's hash (re-exported)

FORMAT = "vllm-gds-sharded"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
ALIGNMENT = 4096  # every tensor's data offset inside its file is a multiple of this
MAX_MANIFEST_BYTES = 256 << 20  # a 405B TP=8 manifest is a few MB
MAX_INT = (1 << 63) - 1  # sizes, offsets, shapes: what an off_t / int64 holds

# Tensor dtypes a shard may hold -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
QUANT_METHODS = ("fp8", "none")
QUANT_SCHEMES = ("per-tensor", "per-channel", "block")

# config.json keys that do not change any weight's bytes or shapes, or that the sharder itself rewrites in
# OUT/config.json (quantization is recorded in the manifest's own `quantization` field).
CONFIG_DIGEST_IGNORED = frozenset({
    "quantization_config", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "use_cache",
})


class ManifestError(ValueError):
    """A manifest (or the folder it describes) is missing, malformed or inconsistent; the message names the
    file and the field."""


def rank_key(pp: int, tp: int) -> str:
    """Key of a rank in ``Manifest.ranks``: ``"pp{pp}-tp{tp}"``."""
    return f"pp{pp}-tp{tp}"


def rank_dir(pp: int, tp: int) -> str:
    """Folder (relative to OUT) holding a rank's files: ``"rank-pp{pp}-tp{tp}"``."""
    return f"rank-{rank_key(pp, tp)}"


def xxh3_128_file(path: str | os.PathLike[str], chunk: int = 16 << 20) -> str:
    """Hex xxh3-128 digest of a file's bytes (the per-file digest recorded in the manifest)."""
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the config fields that affect weights (see CONFIG_DIGEST_IGNORED).

    The source's config.json and OUT/config.json give the same digest, so a loader can check that a manifest
    belongs to the config next to it."""
    kept = {k: v for k, v in config.items() if k not in CONFIG_DIGEST_IGNORED}
    canon = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    name: str  # vLLM parameter name in that rank's model
    dtype: str  # torch dtype name without "torch.", a key of DTYPE_SIZES
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file (multiple of ALIGNMENT)
    nbytes: int
    checksum: str | None = None  # 32 hex digits (kernels/checksum/naive.py); None in a version 1 manifest


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX path relative to OUT, e.g. "rank-pp0-tp1/part-0.safetensors"
    size: int
    xxh3_128: str
    tensors: tuple[TensorEntry, ...]


@dataclass(frozen=True)
class RankEntry:
    files: tuple[FileEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    def tensors(self) -> dict[str, tuple[FileEntry, TensorEntry]]:
        """Parameter name -> (file, tensor) for this rank."""
        return {t.name: (f, t) for f in self.files for t in f.tensors}


@dataclass(frozen=True)
class SourceFile:
    size: int
    sha256: str


@dataclass(frozen=True)
class Source:
    path: str
    files: dict[str, SourceFile]


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    config_digest: str
    dtype: str


@dataclass(frozen=True)
class Parallel:
    tensor_parallel_size: int
    pipeline_parallel_size: int


@dataclass(frozen=True)
class Quantization:
    method: str  # "fp8" | "none"
    scheme: str | None  # "per-tensor" | "per-channel" | "block" for fp8, None for "none"


@dataclass(frozen=True)
class CreatedBy:
    plugin: str
    vllm: str
    torch: str


@dataclass(frozen=True)
class Manifest:
    created_by: CreatedBy
    source: Source
    model: ModelInfo
    parallel: Parallel
    quantization: Quantization
    ranks: dict[str, RankEntry]  # rank_key(pp, tp) -> RankEntry
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    # Not serialized: where the manifest was loaded from (for error messages and path resolution).
    origin: Path | None = field(default=None, compare=False)

    def rank(self, pp: int, tp: int) -> RankEntry:
        key = rank_key(pp, tp)
        try:
            return self.ranks[key]
        except KeyError:
            raise ManifestError(f"{self.origin or MANIFEST_NAME}: no rank {key!r} (tp={self.parallel.tensor_parallel_size}, "
                                f"pp={self.parallel.pipeline_parallel_size})") from None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("origin")
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Validate, then write atomically (temp file + fsync + rename) to ``path`` (a folder or a file name)."""
        target = _manifest_path(path)
        data = self.to_json()
        parse_manifest(json.loads(json.dumps(data)), target)  # never write what load() would refuse
        text = json.dumps(data, indent=1) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read and strictly validate ``path`` (an output folder or its manifest.json)."""
        target = _manifest_path(path)
        try:
            with open(target, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)  # bounded: never allocate what the file claims
            if len(data) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{target}: larger than {MAX_MANIFEST_BYTES} bytes; not a shard manifest")
            raw = json.loads(data.decode("utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{target}: not found (the folder is not a complete vllm-gds shard output)") from None
        # ValueError: JSONDecodeError, and integers beyond Python's digit limit; RecursionError: deep nesting.
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"{target}: unreadable: {str(e):.300}") from None
        return parse_manifest(raw, target)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() or p.suffix != ".json" else p


# ---------------------------------------------------------------------------------------------------------------
# Strict parsing: every level must have exactly the expected keys with the expected types.


class _Ctx:
    def __init__(self, origin: Path) -> None:
        self.origin = origin

    def fail(self, where: str, msg: str) -> ManifestError:
        return ManifestError(f"{self.origin}: field {where}: {msg}")

    def obj(self, value: Any, where: str, keys: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {type(value).__name__}")
        missing, extra = keys - value.keys(), value.keys() - keys
        if missing:
            raise self.fail(where, f"missing key(s) {sorted(missing)}")
        if extra:
            raise self.fail(where, f"unknown key(s) {sorted(extra)}")
        return value

    def str_(self, value: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"expected a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.fail(where, f"{value!r} is not one of {list(choices)}")
        return value

    def int_(self, value: Any, where: str, minimum: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= MAX_INT:
            raise self.fail(where, f"expected an integer in [{minimum}, 2**63), got {value!r:.80}")
        return value

    def hex_(self, value: Any, where: str, length: int) -> str:
        s = self.str_(value, where)
        if len(s) != length or any(c not in "0123456789abcdef" for c in s):
            raise self.fail(where, f"expected {length} lowercase hex digits, got {s!r}")
        return s

    def relpath(self, value: Any, where: str) -> str:
        s = self.str_(value, where)
        p = PurePosixPath(s)
        if not s.isprintable() or p.is_absolute() or ".." in p.parts or "\\" in s or str(p) != s:
            raise self.fail(where, f"expected a normalized relative POSIX path, got {s!r}")
        return s


def _parse_tensor(c: _Ctx, raw: Any, where: str, version: int) -> TensorEntry:
    keys = {"name", "dtype", "shape", "offset", "nbytes"}
    d = c.obj(raw, where, keys if version == 1 else keys | {"checksum"})
    dtype = c.str_(d["dtype"], f"{where}.dtype", tuple(DTYPE_SIZES))
    if not isinstance(d["shape"], list):
        raise c.fail(f"{where}.shape", f"expected a list, got {d['shape']!r}")
    shape = tuple(c.int_(s, f"{where}.shape[{i}]") for i, s in enumerate(d["shape"]))
    numel = 1
    for s in shape:  # early exit: a lying shape must not build a huge integer
        numel = min(numel * s, MAX_INT + 1)
    offset = c.int_(d["offset"], f"{where}.offset")
    nbytes = c.int_(d["nbytes"], f"{where}.nbytes")
    if offset % ALIGNMENT:
        raise c.fail(f"{where}.offset", f"{offset} is not a multiple of {ALIGNMENT}")
    if nbytes != numel * DTYPE_SIZES[dtype]:
        raise c.fail(f"{where}.nbytes", f"{nbytes} != prod({list(shape)}) * sizeof({dtype})")
    checksum = None if version == 1 else c.hex_(d["checksum"], f"{where}.checksum", 32)
    return TensorEntry(c.str_(d["name"], f"{where}.name"), dtype, shape, offset, nbytes, checksum)


def _parse_file(c: _Ctx, raw: Any, where: str, version: int) -> FileEntry:
    d = c.obj(raw, where, {"path", "size", "xxh3_128", "tensors"})
    path = c.relpath(d["path"], f"{where}.path")
    size = c.int_(d["size"], f"{where}.size")
    if not isinstance(d["tensors"], list) or not d["tensors"]:
        raise c.fail(f"{where}.tensors", "expected a non-empty list")
    tensors = tuple(_parse_tensor(c, t, f"{where}.tensors[{i}]", version) for i, t in enumerate(d["tensors"]))
    end = 0
    for i, t in sorted(enumerate(tensors), key=lambda it: it[1].offset):
        if t.offset < end:
            raise c.fail(f"{where}.tensors[{i}]", f"{t.name!r} overlaps the previous tensor")
        end = t.offset + t.nbytes
    if end > size:
        raise c.fail(f"{where}.size", f"{size} is smaller than the end of the last tensor ({end})")
    return FileEntry(path, size, c.hex_(d["xxh3_128"], f"{where}.xxh3_128", 32), tensors)


def parse_manifest(raw: Any, origin: Path) -> Manifest:
    """Validate a decoded manifest.json; raise ManifestError naming ``origin`` and the bad field."""
    c = _Ctx(origin)
    top = {"format", "format_version", "created_by", "source", "model", "parallel", "quantization", "ranks"}
    if isinstance(raw, dict) and raw.get("format") == FORMAT and raw.get("format_version") not in READABLE_VERSIONS:
        raise c.fail("format_version", f"{raw.get('format_version')!r} is not supported (this plugin reads "
                                       f"versions {list(READABLE_VERSIONS)}; re-run vllm-gds shard)")
    d = c.obj(raw, "<root>", top)
    c.str_(d["format"], "format", (FORMAT,))
    version = c.int_(d["format_version"], "format_version")

    cb = c.obj(d["created_by"], "created_by", {"plugin", "vllm", "torch"})
    created_by = CreatedBy(*(c.str_(cb[k], f"created_by.{k}") for k in ("plugin", "vllm", "torch")))

    src = c.obj(d["source"], "source", {"path", "files"})
    if not isinstance(src["files"], dict) or not src["files"]:
        raise c.fail("source.files", "expected a non-empty object")
    files = {}
    for name, entry in src["files"].items():
        where = f"source.files[{name!r}]"
        fe = c.obj(entry, where, {"size", "sha256"})
        files[c.relpath(name, where)] = SourceFile(c.int_(fe["size"], f"{where}.size"),
                                                   c.hex_(fe["sha256"], f"{where}.sha256", 64))
    source = Source(c.str_(src["path"], "source.path"), files)

    m = c.obj(d["model"], "model", {"architecture", "config_digest", "dtype"})
    model = ModelInfo(c.str_(m["architecture"], "model.architecture"),
                      c.hex_(m["config_digest"], "model.config_digest", 64),
                      c.str_(m["dtype"], "model.dtype", ("bfloat16", "float16", "float32")))

    p = c.obj(d["parallel"], "parallel", {"tensor_parallel_size", "pipeline_parallel_size"})
    parallel = Parallel(c.int_(p["tensor_parallel_size"], "parallel.tensor_parallel_size", 1),
                        c.int_(p["pipeline_parallel_size"], "parallel.pipeline_parallel_size", 1))

    q = c.obj(d["quantization"], "quantization", {"method", "scheme"})
    method = c.str_(q["method"], "quantization.method", QUANT_METHODS)
    if method == "none":
        if q["scheme"] is not None:
            raise c.fail("quantization.scheme", "must be null when method is 'none'")
        scheme = None
    else:
        scheme = c.str_(q["scheme"], "quantization.scheme", QUANT_SCHEMES)
    quantization = Quantization(method, scheme)

    if not isinstance(d["ranks"], dict):
        raise c.fail("ranks", "expected an object")
    if len(d["ranks"]) != parallel.pipeline_parallel_size * parallel.tensor_parallel_size:
        raise c.fail("ranks", f"{len(d['ranks'])} rank(s) for tp={parallel.tensor_parallel_size} "
                              f"pp={parallel.pipeline_parallel_size}")
    expected = {rank_key(pp, tp) for pp in range(parallel.pipeline_parallel_size)
                for tp in range(parallel.tensor_parallel_size)}
    if set(d["ranks"]) != expected:
        raise c.fail("ranks", f"keys {sorted(d['ranks'])} != expected {sorted(expected)} for the parallel sizes")
    ranks: dict[str, RankEntry] = {}
    seen_paths: set[str] = set()
    for key, rank in d["ranks"].items():
        r = c.obj(rank, f"ranks.{key}", {"files"})
        if not isinstance(r["files"], list) or not r["files"]:
            raise c.fail(f"ranks.{key}.files", "expected a non-empty list")
        rfiles = tuple(_parse_file(c, f, f"ranks.{key}.files[{i}]", version) for i, f in enumerate(r["files"]))
        names: set[str] = set()
        for f in rfiles:
            if f.path in seen_paths:
                raise c.fail(f"ranks.{key}.files", f"path {f.path!r} listed twice")
            seen_paths.add(f.path)
            for t in f.tensors:
                if t.name in names:
                    raise c.fail(f"ranks.{key}", f"tensor {t.name!r} appears twice")
                names.add(t.name)
        ranks[key] = RankEntry(rfiles)

    return Manifest(created_by, source, model, parallel, quantization, ranks, FORMAT, version, origin=origin)
