#!/usr/bin/env bash
# README demo command: set everything up on a fresh machine, then run the demo on the embedded model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" scripts/demo.py "$@"
