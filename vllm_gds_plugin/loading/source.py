"""The source Hugging Face checkpoint: validation (missing / truncated files), fingerprint, tensor stream."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_gds_plugin.loading.manifest import SourceFile, sha256_file
from vllm_gds_plugin.loading.st_header import HeaderError, read_header

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
INDEX_NAME = "model.safetensors.index.json"


class ShardError(ValueError):
    """Bad input or a failed ``vllm-gds shard`` run; the message names the file and what was wrong."""


@dataclass(frozen=True)
class SourceCheckpoint:
    root: Path
    config: dict
    weight_files: tuple[Path, ...]
    tensor_bytes: int  # sum of all tensors' data bytes

    @classmethod
    def open(cls, root: Path) -> SourceCheckpoint:
        root = Path(root)
        if not root.is_dir():
            raise ShardError(f"{root}: source checkpoint folder not found")
        cfg_path = root / "config.json"
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ShardError(f"{cfg_path}: missing (not a Hugging Face checkpoint folder)") from None
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON / UTF-8
            raise ShardError(f"{cfg_path}: unreadable: {str(e):.300}") from None
        if not isinstance(config, dict):
            raise ShardError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
        files = _weight_files(root)
        total = sum(_check_safetensors(f) for f in files)
        return cls(root, config, files, total)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if len(archs) != 1:
            raise ShardError(f"{self.root / 'config.json'}: expected exactly one entry in 'architectures', "
                             f"got {archs}")
        return str(archs[0])

    @property
    def dtype(self) -> str:
        dtype = str(self.config.get("torch_dtype") or self.config.get("dtype") or "bfloat16")
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ShardError(f"{self.root / 'config.json'}: unsupported torch_dtype {dtype!r}")
        return dtype

    def side_files(self) -> list[Path]:
        """Top-level non-weight files to copy next to the shards (config, tokenizer, generation config...)."""
        return sorted(p for p in self.root.iterdir()
                      if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)
                      and p.name != INDEX_NAME)

    def fingerprint(self) -> dict[str, SourceFile]:
        """sha256 + size of every file the output depends on (weights and side files)."""
        return {p.relative_to(self.root).as_posix(): SourceFile(p.stat().st_size, sha256_file(p))
                for p in sorted({*self.weight_files, *self.side_files()})}

    def tensors(self, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, one at a time, memory-mapped from the files."""
        from safetensors import safe_open

        for path in self.weight_files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if on_bytes:
                        on_bytes(t.numel() * t.element_size())
                    yield name, t


def _weight_files(root: Path) -> tuple[Path, ...]:
    index = root / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as e:
            raise ShardError(f"{index}: unreadable safetensors index: {str(e):.300}") from None
        names = set(weight_map.values()) if isinstance(weight_map, dict) else {None}
        bad = [n for n in names if not isinstance(n, str) or not n or "/" in n or n in (".", "..") or "\0" in n]
        if bad:
            raise ShardError(f"{index}: weight_map values must be file names next to the index, got {bad[:3]!r:.300}")
        files = tuple(root / n for n in sorted(names))
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ShardError(f"{index}: lists missing weight file(s) {missing}")
        return files
    files = tuple(sorted(root.glob("*.safetensors")))
    if not files:
        other = sorted(p.name for p in root.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        raise ShardError(f"{root}: no *.safetensors weight files" +
                         (f" (found {other}; convert them to safetensors first)" if other else ""))
    return files


def _check_safetensors(path: Path) -> int:
    """Validate the header strictly (st_header: bounded, dtypes, shapes, offsets tiling the file exactly) so
    safetensors' own parser never meets a file it would reject later; return the data bytes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = read_header(f.fileno(), size)
    except HeaderError as e:
        raise ShardError(f"{path}: not a valid safetensors file: {e}") from None
    except OSError as e:
        raise ShardError(f"{path}: unreadable: {e}") from None
    return size - header.data_start
