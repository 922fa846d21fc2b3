#!/usr/bin/env bash
# GPU machine set-up after the vLLM 0.26 bundle parts and the model parts were staged (see docs/gpu-runs.md).
# Installs vLLM 0.26 into /tmp/site (bundle), this plugin next to it (no dependencies: torch stays the machine's),
# (--upgrade: a second run must replace the first install, not keep it), and rebuilds the embedded model's HF folder from the staged GGUF (sha256-checked) into $VLLM_GDS_CACHE.
# Source it: `source scripts/gpu/setup.sh`.
set -e
[ -d /tmp/site/vllm ] || bash /tmp/gpu-stage/install.sh
source /tmp/gpu-stage/env.sh
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site . >/tmp/plugin-install.log 2>&1 \
  || { cat /tmp/plugin-install.log; return 1 2>/dev/null || exit 1; }
ls /tmp/gpu-model/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/gpu-model/*.whl
export VLLM_GDS_CACHE=/tmp/vllm-gds-cache
if [ -f /tmp/gpu-model/gguf.part0 ] && [ ! -f $VLLM_GDS_CACHE/gguf/smollm2-135m-instruct.gguf ]; then
  mkdir -p $VLLM_GDS_CACHE/gguf $VLLM_GDS_CACHE/text
  cat /tmp/gpu-model/gguf.part* > $VLLM_GDS_CACHE/gguf/smollm2-135m-instruct.gguf
  cp /tmp/gpu-model/lee_background.cor $VLLM_GDS_CACHE/text/
  python3 -c "
from pathlib import Path
from vllm_gds_plugin import assets as a
for f, want in [(a.cache_root()/'gguf/smollm2-135m-instruct.gguf', a.SMOLLM2.sha256), (a.cache_root()/'text/lee_background.cor', a.LEE_TEXT.sha256)]:
    assert a.sha256_file(f) == want, f
print('model:', a.model_dir())"
fi
set +e
