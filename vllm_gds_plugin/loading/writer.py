"""Write safetensors files whose tensor data start at 4 KiB-aligned absolute offsets (direct I/O / GDS friendly).

safetensors requires the data section to be covered by tensors without holes, so alignment is made with
(1) spaces at the end of the JSON header (allowed by the format) so the data section starts on a 4 KiB
boundary, and (2) uint8 padding tensors named ``__vllm_gds_pad_<k>`` between real tensors. Padding tensors are
not in the manifest; ``safetensors.safe_open`` reads the files normally.

Data go out in large sequential writes from the tensors' own memory (no second copy), hashed on the way.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from vllm_gds_plugin.loading.manifest import ALIGNMENT, FileEntry, TensorEntry

PAD_PREFIX = "__vllm_gds_pad_"
# __metadata__ key holding the file's own path relative to OUT: the loader refuses a part file found at another
# path (a file of another rank copied in its place) without having to hash it.
PATH_METADATA_KEY = "vllm_gds.path"
_ZEROS = bytes(ALIGNMENT)
# torch dtype -> (safetensors dtype tag, manifest dtype name)
_DTYPES: dict[torch.dtype, tuple[str, str]] = {
    torch.float32: ("F32", "float32"), torch.bfloat16: ("BF16", "bfloat16"), torch.float16: ("F16", "float16"),
    torch.float8_e4m3fn: ("F8_E4M3", "float8_e4m3fn"), torch.float8_e5m2: ("F8_E5M2", "float8_e5m2"),
    torch.int64: ("I64", "int64"), torch.int32: ("I32", "int32"), torch.int16: ("I16", "int16"),
    torch.int8: ("I8", "int8"), torch.uint8: ("U8", "uint8"), torch.bool: ("BOOL", "bool"),
}


def manifest_dtype(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype][1]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in a shard") from None


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class _Placed:
    name: str
    tensor: torch.Tensor
    offset: int  # absolute offset in the file


def _layout(tensors: Sequence[tuple[str, torch.Tensor]], rel_path: str) -> tuple[bytes, list[_Placed], int]:
    """Header bytes (length prefix + padded JSON), placements, and total file size."""
    # Offsets relative to the data section; each real tensor starts aligned, padding tensors fill the gaps.
    placed_rel: list[tuple[str, torch.Tensor, int]] = []
    header: dict[str, dict] = {"__metadata__": {PATH_METADATA_KEY: rel_path}}
    pos, pads = 0, 0
    for name, t in tensors:
        start = _align(pos)
        if start > pos:
            header[f"{PAD_PREFIX}{pads}"] = {"dtype": "U8", "shape": [start - pos], "data_offsets": [pos, start]}
            pads += 1
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype][0], "shape": list(t.shape), "data_offsets": [start, start + nbytes]}
        placed_rel.append((name, t, start))
        pos = start + nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    data_start = _align(8 + len(text))
    text += b" " * (data_start - 8 - len(text))
    head = struct.pack("<Q", len(text)) + text
    return head, [_Placed(n, t, data_start + rel) for n, t, rel in placed_rel], data_start + pos


def write_aligned_safetensors(path: Path, tensors: Sequence[tuple[str, torch.Tensor]], rel_path: str,
                              on_bytes: Callable[[int], None] | None = None) -> FileEntry:
    """Write ``tensors`` (in order) to ``path``; return its manifest entry (size, xxh3-128, tensor offsets)."""
    head, placed, size = _layout(tensors, rel_path)
    h = xxhash.xxh3_128()
    entries: list[TensorEntry] = []
    with open(path, "wb", buffering=0) as f:
        def put(buf: bytes | memoryview) -> None:
            mv = memoryview(buf)
            while mv:  # a raw write may be short
                n = f.write(mv)
                mv = mv[n:]
            h.update(buf)
            if on_bytes:
                on_bytes(len(buf))

        put(head)
        pos = len(head)
        for p in placed:
            if p.offset > pos:
                put(_ZEROS[: p.offset - pos])
            data = p.tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            put(memoryview(data))
            pos = p.offset + data.nbytes
            entries.append(TensorEntry(p.name, manifest_dtype(p.tensor.dtype), tuple(p.tensor.shape),
                                       p.offset, data.nbytes))
        f.flush()
        os.fsync(f.fileno())
    if pos != size:
        raise AssertionError(f"{path}: wrote {pos} bytes, layout said {size}")
    return FileEntry(rel_path, size, h.hexdigest(), tuple(entries))


def split_parts(tensors: Sequence[tuple[str, torch.Tensor]], max_file_size: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Group tensors (keeping order) into files of at most ``max_file_size`` data bytes (a larger tensor gets
    a file of its own)."""
    parts: list[list[tuple[str, torch.Tensor]]] = [[]]
    used = 0
    for name, t in tensors:
        nbytes = _align(t.numel() * t.element_size())
        if parts[-1] and used + nbytes > max_file_size:
            parts.append([])
            used = 0
        parts[-1].append((name, t))
        used += nbytes
    return parts
