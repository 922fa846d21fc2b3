"""Which calibration file (calibration.py) an engine serving a model uses, checked against that model.

Setting (``--additional-config '{"turboquant": {"calibration": ...}}'``, see selection.py):

- absent: automatic. ``MODEL/turboquant_calibration.tqcal``; for a ``vllm-gds shard`` output folder (it has a
  ``manifest.json``) also the same file in the source model folder recorded in the manifest. None found: the
  engine runs uncalibrated and logs ONE warning per process with the ``vllm-gds calibrate`` command that fixes it.
- ``"none"``: uncalibrated on purpose, no warning.
- a path: that file (or that folder's calibration file); it must exist.

A file whose ``[layers, kv_heads, head_dim]`` differ from the served model's is refused at engine start
(``TurboQuantCalibrationError`` naming the file): centering keys with another model's means would silently
degrade every layer.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from vllm_gds_plugin.kvcache.calibration import CALIBRATION_FILE, TurboQuantCalibration, TurboQuantCalibrationError

# Under vLLM's logger so that vLLM's log configuration shows it (as the gds-sharded loader's lines).
log = logging.getLogger("vllm.gds_turboquant")

OFF = "none"
MANIFEST = "manifest.json"  # vllm_gds_plugin.loading.manifest.MANIFEST_NAME (not imported: keeps this light)

_warned = False


def source_model_dir(model: Path) -> Path | None:
    """The source model folder a ``vllm-gds shard`` output was made from (its manifest's ``source.path``)."""
    manifest = model / MANIFEST
    if not manifest.is_file():
        return None
    try:
        path = json.loads(manifest.read_text())["source"]["path"]
    except (ValueError, KeyError, TypeError):
        return None  # the loader reports a broken manifest with the details; here it only means "no source"
    return Path(path) if isinstance(path, str) else None


def candidates(model: str) -> list[Path]:
    """Where the automatic lookup searches, in order."""
    folder = Path(model)
    found = [folder / CALIBRATION_FILE]
    source = source_model_dir(folder) if folder.is_dir() else None
    if source is not None:
        found.append(source / CALIBRATION_FILE)
    return found


def _fix_command(model: str) -> str:
    folder = Path(model)
    source = source_model_dir(folder) if folder.is_dir() else None
    if source is not None:  # a shard output holds FP8 shards, not the HF weights calibrate runs
        return f"vllm-gds calibrate {source} --output {folder / CALIBRATION_FILE}"
    if folder.is_dir():
        return f"vllm-gds calibrate {folder}"
    return f"vllm-gds calibrate <local Hugging Face folder of {model}>"


def _check_fits(cal: TurboQuantCalibration, path: Path, model: str, shape: tuple[int, int, int]) -> None:
    if cal.shape != shape:
        names = ("layers", "KV heads", "head_dim")
        diff = ", ".join(f"{n} {a} vs model {b}" for n, a, b in zip(names, cal.shape, shape) if a != b)
        raise TurboQuantCalibrationError(
            f"TurboQuant calibration {path} does not fit model {model} ({diff}): it was measured on another model. "
            f"Re-run `{_fix_command(model)}`, or pass --additional-config "
            f"'{{\"turboquant\": {{\"calibration\": \"{OFF}\"}}}}' to run uncalibrated")


@functools.lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int, size: int) -> TurboQuantCalibration:
    """Read once per process and file version (every attention layer of an engine asks for it)."""
    cal = TurboQuantCalibration.load(path)
    log.info("TurboQuant calibration: %s (%d tokens of %s)", path, cal.tokens, cal.source or "unknown text")
    return cal


def model_calibration(setting: str | None, model: str, layers: int, kv_heads: int,
                      head_dim: int) -> TurboQuantCalibration | None:
    """The calibration to use for ``model`` (``layers`` x ``kv_heads`` model-wide x ``head_dim``), or None."""
    global _warned
    if setting == OFF:
        return None
    if setting is not None:
        path = Path(setting)
        path = path / CALIBRATION_FILE if path.is_dir() else path
        if not path.is_file():
            raise TurboQuantCalibrationError(f"--additional-config turboquant calibration: {path} does not exist")
    else:
        found = next((p for p in candidates(model) if p.is_file()), None)
        if found is None:
            if not _warned:
                _warned = True
                where = " or ".join(str(p) for p in candidates(model))
                log.warning("TurboQuant KV cache runs WITHOUT calibration for %s (no %s): perplexity is measurably "
                            "higher (docs/turboquant.md). Fix: `%s` (seconds to minutes, once per model), then "
                            "restart.", model, where, _fix_command(model))
            return None
        path = found
    st = path.resolve().stat()
    cal = _load(path.resolve(), st.st_mtime_ns, st.st_size)
    _check_fits(cal, path, model, (layers, kv_heads, head_dim))
    return cal
