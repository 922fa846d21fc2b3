#!/usr/bin/env bash
# GPU machine (no package index): copy one carried folder of model/text parts into /tmp/gpu-model.
# Used as: bash scripts/gpu/stage_model.sh .gpu-carry/a   (one carried folder per call, like the vLLM bundle)
set -euo pipefail
mkdir -p /tmp/gpu-model
cp "$1"/* /tmp/gpu-model/
ls /tmp/gpu-model
