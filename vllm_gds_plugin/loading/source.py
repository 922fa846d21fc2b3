"""The source Hugging Face checkpoint: validation (missing / truncated files), fingerprint, tensor stream.

Tensors are read with large ``preadv`` calls into two reused buffers, on reader threads one batch ahead of the
consumer (vLLM's load_weights of every rank being made). Measured A/B on the 2-core box against per-tensor maps of
the page cache (populated a batch ahead, unmapped after use: no copy at all), reading was 1.2-1.7x faster for
2- and 8-layer Llama-3.1-8B shapes: the page-table work of mapping and unmapping costs more than the copy, and
the buffers' pages are faulted in once per process. Headers are parsed once by the strict st_header parser. The
fingerprint (sha256) reads with its own reused buffers on background threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_gds_plugin.loading.manifest import SourceFile
from vllm_gds_plugin.loading.st_header import Header, HeaderError, HeaderTensor, read_header

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
    headers: tuple[Header, ...]  # parsed header of each weight file

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
        headers = tuple(_check_safetensors(f) for f in files)
        for f, h in zip(files, headers):
            for name, t in h.tensors.items():
                if t.dtype not in _TORCH_DTYPES:
                    raise ShardError(f"{f}: tensor {name!r:.200} has dtype {t.dtype}, which torch cannot hold")
        total = sum(t.end - t.begin for h in headers for t in h.tensors.values())
        return cls(root, config, files, total, headers)

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
        return sorted(p for p in self.root.iterdir() if p.is_file() and is_side_file(p.name))

    def fingerprint(self) -> Fingerprint:
        """Start hashing every file the output depends on (weights and side files) in the background."""
        return Fingerprint(self.root, sorted({*self.weight_files, *self.side_files()}))

    def specs(self) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of every tensor, in the order :meth:`tensors` yields them."""
        for h in self.headers:
            for name, t in _ordered(h):
                yield name, t.shape, _TORCH_DTYPES[t.dtype]

    def tensors(self, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, one at a time (see :meth:`batches`: a tensor is valid until the
        first tensor of the batch after its own is taken)."""
        for batch in self.batches(READ_BATCH_BYTES, on_bytes):
            yield from batch

    def batch_plan(self, max_bytes: int) -> list[BatchPlan]:
        """The batches :meth:`batches` yields for ``max_bytes``, before reading anything."""
        return [BatchPlan([(name, t.shape, _TORCH_DTYPES[t.dtype]) for _, name, t in b], _batch_bytes(b))
                for b in _plan_batches(list(zip(self.weight_files, self.headers)), max_bytes)]

    def batches(self, max_bytes: int, on_bytes: Callable[[int], None] | None = None,
                ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Every tensor in natural name order within each file (layer 2 before layer 10: the order vLLM's
        models list their parameters), grouped into consecutive batches of about ``max_bytes`` (a larger tensor
        alone). The tensors of a batch are views of a buffer that is reused for the batch after next: they are
        valid until the next batch is requested (load_weights copies what it keeps)."""
        plan = _plan_batches(list(zip(self.weight_files, self.headers)), max_bytes)
        if not plan:
            return
        buffers = _BUFFERS.take(max(_batch_bytes(b) for b in plan), min(2, len(plan)))
        files: dict[Path, int] = {}
        try:
            for path, h in zip(self.weight_files, self.headers):
                files[path] = os.open(path, os.O_RDONLY)
                size = os.fstat(files[path]).st_size
                if size != _file_end(h):  # the reads must cover exactly what the checked header describes
                    raise ShardError(f"{path}: changed size while sharding ({size} bytes, header says "
                                     f"{_file_end(h)})")
            with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="vllm-gds-read") as reader:
                pending = _start_batch(reader, plan[0], buffers[0], files)
                for i in range(len(plan)):
                    batch = [(name, _joined(chunks, view)) for name, view, chunks in pending]
                    if i + 1 < len(plan):
                        pending = _start_batch(reader, plan[i + 1], buffers[(i + 1) % 2], files)
                    if on_bytes:
                        on_bytes(sum(t.nbytes for _, t in batch))
                    yield batch
        finally:
            for fd in files.values():
                os.close(fd)
            _BUFFERS.give_back(buffers)


@dataclass(frozen=True)
class BatchPlan:
    specs: list[tuple[str, tuple[int, ...], torch.dtype]]  # (name, shape, dtype) of each tensor, in order
    nbytes: int  # read buffer bytes the batch takes


# Batch size of :meth:`SourceCheckpoint.tensors` (one tensor at a time for its caller, read in large batches).
READ_BATCH_BYTES = 64 << 20
READ_THREADS = 4
READ_CHUNK = 64 << 20
_SLOT_ALIGN = 64  # each tensor's place in a read buffer (any dtype's element size divides it)

_Planned = tuple[Path, str, HeaderTensor]  # (file, tensor name, where it is)


class _BufferPool:
    """Read buffers kept for the next :meth:`SourceCheckpoint.batches` in this process (the next rank): freshly
    allocated memory costs a page fault per 4 KiB on first touch (measured on the 2-core VM: 1-2.5 s of kernel
    time per GB), paid once per process instead of once per rank. A buffer belongs to one reader at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []

    def take(self, capacity: int, count: int) -> list[torch.Tensor]:
        with self._lock:
            fits = sorted((b for b in self._free if b.numel() >= capacity), key=torch.Tensor.numel)[:count]
            taken = {id(b) for b in fits}
            self._free = [b for b in self._free if id(b) not in taken]
        return [b[:capacity] for b in fits] + [torch.empty(capacity, dtype=torch.uint8)
                                                for _ in range(count - len(fits))]

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:  # keep the largest two (whole storages, not the views handed out)
            whole = [torch.empty(0, dtype=torch.uint8).set_(b.untyped_storage()) for b in buffers]
            self._free = sorted(self._free + whole, key=torch.Tensor.numel)[-2:]


    def clear(self) -> None:
        with self._lock:
            self._free = []


_BUFFERS = _BufferPool()


def release_read_buffers() -> None:
    """Free the read buffers kept for reuse (at the end of a ``shard`` run)."""
    _BUFFERS.clear()


def _plan_batches(files: list[tuple[Path, Header]], max_bytes: int) -> list[list[_Planned]]:
    plan: list[list[_Planned]] = []
    used = 0
    for path, h in files:
        for name, t in _ordered(h):
            n = _slot(t)
            if not plan or (plan[-1] and used + n > max_bytes):
                plan.append([])
                used = 0
            plan[-1].append((path, name, t))
            used += n
    return plan


def _slot(t: HeaderTensor) -> int:
    return -(-(t.end - t.begin) // _SLOT_ALIGN) * _SLOT_ALIGN


def _batch_bytes(batch: list[_Planned]) -> int:
    return sum(_slot(t) for _, _, t in batch)


def _start_batch(reader: ThreadPoolExecutor, batch: list[_Planned], buffer: torch.Tensor, files: dict[Path, int],
                 ) -> list[tuple[str, torch.Tensor, list[Future]]]:
    """Queue the reads of a planned batch into ``buffer``, in chunks of at most READ_CHUNK so that several
    threads copy from the page cache at once (one thread copies about 5 GB/s); per tensor, its view in
    ``buffer`` and the futures of its chunks."""
    out = []
    pos = 0
    mem = memoryview(buffer.numpy())
    for path, name, t in batch:
        n = t.end - t.begin
        chunks = [reader.submit(_pread, files[path], path, name, mem[pos + c:pos + min(n, c + READ_CHUNK)],
                                t.begin + c) for c in range(0, n, READ_CHUNK)]
        view = buffer[pos:pos + n].view(_TORCH_DTYPES[t.dtype]).view(t.shape)
        out.append((name, view, chunks))
        pos += _slot(t)
    return out


def _pread(fd: int, path: Path, name: str, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):  # preadv releases the GIL
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise ShardError(f"{path}: truncated while sharding (tensor {name!r:.200})")
        got += k


def _joined(chunks: list[Future], view: torch.Tensor) -> torch.Tensor:
    for c in chunks:
        c.result()
    return view


def is_side_file(name: str) -> bool:
    """A top-level source file copied into OUT as is (tokenizer files, generation config, the TurboQuant
    calibration ``turboquant_calibration.tqcal``...): not hidden, not weights, not the weights' index."""
    return not name.startswith(".") and not name.endswith(WEIGHT_SUFFIXES) and name != INDEX_NAME


def sha256_file(path: Path, buf: memoryview | None = None, stop: threading.Event | None = None) -> str:
    """Hex sha256 of a file, read into ``buf`` (reused by the caller: a fresh buffer per read costs a page fault
    per 4 KiB); gives up early (returning "") once ``stop`` is set."""
    view = buf if buf is not None else memoryview(bytearray(16 << 20))
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while not (stop is not None and stop.is_set()) and (n := f.readinto(view)):
            h.update(view[:n])  # releases the GIL
    return h.hexdigest() if stop is None or not stop.is_set() else ""


class Fingerprint:
    """sha256 + size of source files, computed on background threads (hashlib releases the GIL) while the
    ranks are built and written, so the source is hashed once without adding its read time to the run."""

    CHUNK = 16 << 20

    def __init__(self, root: Path, paths: list[Path], threads: int = 4) -> None:
        self._root, self._paths = root, paths
        self._todo = sorted(paths, key=lambda p: p.stat().st_size)  # largest first (popped from the end)
        self._digests: dict[Path, str] = {}
        self._errors: list[OSError] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name="vllm-gds-sha256", daemon=True)
                         for _ in range(max(1, min(threads, len(paths))))]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        buf = memoryview(bytearray(self.CHUNK))
        while not self._stop.is_set():
            with self._lock:
                if not self._todo:
                    return
                path = self._todo.pop()
            try:
                self._digests[path] = sha256_file(path, buf, self._stop)
            except OSError as e:
                self._errors.append(e)

    def result(self) -> dict[str, SourceFile]:
        for t in self._threads:
            t.join()
        if self._errors:
            raise ShardError(f"reading the source to fingerprint it failed: {self._errors[0]}")
        if self._stop.is_set():
            raise ShardError("source fingerprint was cancelled")
        return {p.relative_to(self._root).as_posix(): SourceFile(p.stat().st_size, self._digests[p])
                for p in self._paths}

    def cancel(self) -> None:
        """Stop hashing (after a failure or Ctrl-C) without waiting for the threads."""
        self._stop.set()


# safetensors dtype tag -> torch dtype (the tags this torch build can hold)
_TORCH_DTYPES: dict[str, torch.dtype] = {tag: getattr(torch, name) for tag, name in {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
}.items() if hasattr(torch, name)}
_DIGITS = re.compile(r"(\d+)")


def _natural(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in _DIGITS.split(name)]


def _ordered(h: Header) -> list[tuple[str, HeaderTensor]]:
    return sorted(h.tensors.items(), key=lambda it: _natural(it[0]))


def _file_end(h: Header) -> int:
    return max((t.end for t in h.tensors.values()), default=h.data_start)


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


def _check_safetensors(path: Path) -> Header:
    """Validate the header strictly (st_header: bounded, dtypes, shapes, offsets tiling the file exactly);
    return it. Nothing is ever read from a file before this passed."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = read_header(f.fileno(), size)
    except HeaderError as e:
        raise ShardError(f"{path}: truncated or not a valid safetensors file: {e}") from None
    except OSError as e:
        raise ShardError(f"{path}: unreadable: {e}") from None
    return header
