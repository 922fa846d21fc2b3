"""Strict, bounded parser of a safetensors file header (the bytes before the tensor data).

Everything read from disk is untrusted: the 8-byte length prefix is checked against the real file size before
anything is allocated from it, the JSON must be a flat object of well-formed entries (known dtype, shape of
non-negative integers, ``data_offsets`` consistent with dtype and shape), and the entries must tile the data
section exactly (no overlap, no hole, nothing past the end) - the rules the safetensors format itself states.
Any violation raises :class:`HeaderError` with what was wrong; callers prefix the file name and re-raise as
their own error type (the loader's ``ShardLoadError``, the sharder's ``ShardError``).

No torch import: dtypes are the safetensors tags (``BF16``, ``F8_E4M3``, ...).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

# safetensors refuses headers above 100 MB; so do we (a real 405B shard header is a few hundred KB).
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"

# safetensors dtype tag -> bits per element
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
# manifest (torch) dtype name -> safetensors tag, for the dtypes a shard may hold (manifest.DTYPE_SIZES)
TORCH_TO_TAG: dict[str, str] = {
    "float32": "F32", "bfloat16": "BF16", "float16": "F16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


class HeaderError(ValueError):
    """The header is malformed or inconsistent with the file; the message says what (not which file)."""


@dataclass(frozen=True)
class HeaderTensor:
    dtype: str  # safetensors tag
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class Header:
    data_start: int  # absolute offset of the data section (8 + header length)
    tensors: dict[str, HeaderTensor]
    metadata: dict[str, str]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HeaderError(f"{what}: expected a non-negative integer, got {value!r:.80}")
    return value


def _entry(name: str, raw: Any, data_start: int, data_bytes: int) -> HeaderTensor:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError(f"tensor {name!r:.200}: expected an object with exactly dtype, shape, data_offsets")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(f"tensor {name!r:.200}: unknown dtype {dtype!r:.80}")
    shape, offsets = raw["shape"], raw["data_offsets"]
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise HeaderError(f"tensor {name!r:.200}: shape must be a list and data_offsets a [begin, end] pair")
    begin, end = (_int(o, f"tensor {name!r:.200} data_offsets") for o in offsets)
    if not begin <= end <= data_bytes:
        raise HeaderError(f"tensor {name!r:.200}: data_offsets [{begin}, {end}] outside the data section "
                          f"({data_bytes} bytes)")
    # Product with early exit: a lying shape must not cost a huge bigint before it is refused.
    numel = 1
    for d in shape:
        numel *= _int(d, f"tensor {name!r:.200} shape")
        if numel * DTYPE_BITS[dtype] > 8 * data_bytes:
            raise HeaderError(f"tensor {name!r:.200}: shape {shape!r:.200} is larger than the data section")
    if numel * DTYPE_BITS[dtype] != 8 * (end - begin):
        raise HeaderError(f"tensor {name!r:.200}: {end - begin} bytes in data_offsets, {dtype}{shape} needs "
                          f"{numel * DTYPE_BITS[dtype] / 8:g}")
    return HeaderTensor(dtype, tuple(shape), data_start + begin, data_start + end)


def parse_header(prefix_and_json: bytes, file_size: int) -> Header:
    """Validate a header given its bytes (8-byte length + JSON) and the size of the whole file."""
    if len(prefix_and_json) < 8:
        raise HeaderError(f"file of {file_size} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix_and_json[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise HeaderError(f"header length {n} does not fit a {file_size}-byte file (truncated or not safetensors)")
    if len(prefix_and_json) < 8 + n:
        raise HeaderError(f"header is {n} bytes but only {len(prefix_and_json) - 8} could be read")
    text = prefix_and_json[8:8 + n]
    try:
        raw = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except HeaderError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise HeaderError(f"header is not valid UTF-8 JSON: {str(e):.200}") from None
    if not isinstance(raw, dict):
        raise HeaderError(f"header must be a JSON object, got {type(raw).__name__}")
    data_start, data_bytes = 8 + n, file_size - 8 - n
    metadata = raw.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError(f"{METADATA_KEY} must be an object of strings")
    tensors = {name: _entry(name, v, data_start, data_bytes) for name, v in raw.items()}
    pos = data_start
    for name, t in sorted(tensors.items(), key=lambda it: (it[1].begin, it[1].end)):
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else f"leaves a hole at byte {pos}"
            raise HeaderError(f"tensor {name!r:.200} at [{t.begin}, {t.end}) {what}")
        pos = t.end
    if pos != file_size:
        raise HeaderError(f"tensors end at byte {pos} but the file has {file_size} bytes")
    return Header(data_start, tensors, metadata)


def read_header(fd: int, file_size: int) -> Header:
    """Read and validate the header of the open file ``fd`` (``file_size`` from its fstat)."""
    prefix = os.pread(fd, 8, 0)
    if len(prefix) == 8:
        (n,) = struct.unpack("<Q", prefix)
        if n <= MAX_HEADER_BYTES and 8 + n <= file_size:  # only then is it safe to read n bytes
            prefix += os.pread(fd, n, 8)
    return parse_header(prefix, file_size)
