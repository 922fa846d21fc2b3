"""Checks of a rank's shard files on disk before (and after) any tensor byte is read.

* :func:`check_rank_files`: the rank folder and every file exist with the manifest's size, and each file's own
  safetensors header agrees with the manifest (names, dtypes, shapes, offsets; and, when the sharder recorded it
  in ``__metadata__``, the file's own path, so a part of another rank copied in its place is refused even with
  verification off). Headers are parsed by :mod:`~vllm_gds_plugin.loading.st_header` (bounded, strict).
* :func:`check_unchanged`: a file's identity (inode, size, mtime, ctime) taken here must still hold when the
  readers open the file and when they are done with it, so a shard rewritten or replaced while the engine loads
  is refused instead of half-read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vllm_gds_plugin.loading.manifest import FileEntry, Manifest, rank_dir, rank_key
from vllm_gds_plugin.loading.readers.base import ShardLoadError
from vllm_gds_plugin.loading.st_header import TORCH_TO_TAG, Header, HeaderError, read_header
# PAD_PREFIX: alignment filler tensors (not in the manifest); PATH_METADATA_KEY: the file's own path.
from vllm_gds_plugin.loading.writer import PAD_PREFIX, PATH_METADATA_KEY

Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    """What changes when a file is replaced or written to."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def check_unchanged(fd: int, path: Path, expected: Identity | None, when: str) -> None:
    """Refuse a file whose identity differs from the one recorded when it was checked."""
    if expected is None:
        return
    got = identity(os.fstat(fd))
    if got != expected:
        fields = ("device", "inode", "size", "mtime_ns", "ctime_ns")
        diff = ", ".join(f"{k} {a} -> {b}" for k, a, b in zip(fields, expected, got) if a != b)
        raise ShardLoadError(f"{path}: shard file changed while loading ({when}: {diff}); "
                             "refusing to serve possibly mixed bytes")


@dataclass(frozen=True)
class CheckedFile:
    entry: FileEntry
    path: Path
    identity: Identity


def _check_path(header: Header, f: FileEntry, path: Path) -> None:
    recorded = header.metadata.get(PATH_METADATA_KEY)
    if recorded is not None and recorded != f.path:
        raise ShardLoadError(f"{path}: this file is {recorded!r:.300} (its header says so), the manifest expects "
                             f"{f.path!r} here (a file of another rank or part copied in its place?)")


def _match(header: Header, f: FileEntry, path: Path) -> None:
    for t in f.tensors:
        h = header.tensors.get(t.name)
        if h is None:
            raise ShardLoadError(f"{path}: tensor {t.name!r} of the manifest is not in the file's header")
        want = (TORCH_TO_TAG[t.dtype], t.shape, t.offset, t.offset + t.nbytes)
        if (h.dtype, h.shape, h.begin, h.end) != want:
            raise ShardLoadError(f"{path}: tensor {t.name!r}: manifest says {t.dtype}{list(t.shape)} at bytes "
                                 f"[{t.offset}, {t.offset + t.nbytes}), the file's header says "
                                 f"{h.dtype}{list(h.shape)} at [{h.begin}, {h.end}) (manifest edited or file "
                                 "replaced?)")
    listed = {t.name for t in f.tensors}
    extra = [n for n in header.tensors if n not in listed and not n.startswith(PAD_PREFIX)]
    if extra:
        raise ShardLoadError(f"{path}: header holds tensor(s) the manifest does not list, e.g. {extra[:3]!r:.300}")


def check_file(root: Path, f: FileEntry, key: str) -> CheckedFile:
    path = root / f.path
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardLoadError(f"{path}: shard file for {key} is missing") from None
    except OSError as e:
        raise ShardLoadError(f"{path}: cannot open shard file for {key}: {e}") from None
    try:
        st = os.fstat(fd)
        try:
            header: Header | HeaderError = read_header(fd, st.st_size)  # bounded by the real size
        except HeaderError as e:
            header = e
        except OSError as e:
            raise ShardLoadError(f"{path}: reading the header failed: {e}") from None
    finally:
        os.close(fd)
    # Most telling first: a whole file from elsewhere, then a wrong size, then a damaged header.
    if isinstance(header, Header):
        _check_path(header, f, path)
    if st.st_size != f.size:
        what = "truncated" if st.st_size < f.size else "larger than recorded"
        raise ShardLoadError(f"{path}: {what}: {st.st_size} bytes on disk, manifest says {f.size}")
    if isinstance(header, HeaderError):
        raise ShardLoadError(f"{path}: bad safetensors header: {header}")
    _match(header, f, path)
    return CheckedFile(f, path, identity(st))


def check_rank_files(manifest: Manifest, root: Path, pp: int, tp: int) -> list[CheckedFile]:
    """Every file of rank (pp, tp) present, of the recorded size, with a header matching the manifest."""
    key = rank_key(pp, tp)
    rank = manifest.rank(pp, tp)
    folder = root / rank_dir(pp, tp)
    if not folder.is_dir():
        raise ShardLoadError(f"{folder}: rank folder for {key} is missing (incomplete copy of the shard output?)")
    return [check_file(root, f, key) for f in rank.files]
