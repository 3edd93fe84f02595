#!/usr/bin/env bash
# GPU validation pack: one command, one results file (bench/results/gpu_check-<device>-<time>.md).
#   bash bench/gpu_check.sh               # on a machine with one CUDA GPU, < 8 minutes
#   bash bench/gpu_check.sh --cpu-smoke   # the same steps at tiny sizes on CPU (run by CI)
# Sections and what they check: see bench/gpu_check.py. Exit status 0 only when every section passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" bench/gpu_check.py "$@"
