#!/usr/bin/env bash
# README test command: set everything up on a fresh machine, then run the whole test suite.
# Fails on any failed test, and also when pytest collects no test at all (its exit code 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --durations=15 "$@"
