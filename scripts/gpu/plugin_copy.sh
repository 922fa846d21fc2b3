#!/usr/bin/env bash
# The plugin's installed layout from a source tree, for the GPU machine without pip: kernels/ becomes the package
# vllm_gds_plugin.kernels (as pyproject.toml maps it). Then PYTHONPATH=DEST, run from outside the source tree
# (its own vllm_gds_plugin/ lacks kernels/ and would shadow DEST).
# Usage: bash scripts/gpu/plugin_copy.sh SRC DEST
set -e
SRC=$1 DEST=$2
rm -rf "$DEST" && mkdir -p "$DEST/vllm_gds_plugin"
cp -r "$SRC"/vllm_gds_plugin/* "$DEST/vllm_gds_plugin/"
cp -r "$SRC/kernels" "$DEST/vllm_gds_plugin/kernels"
