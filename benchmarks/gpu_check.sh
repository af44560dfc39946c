#!/usr/bin/env bash
# The issue-5 GPU check (estimator vs measured peaks, planner + dispatch, 4-bit loading, layer streaming)
# in one run on one H100/H200; about 3-4 minutes, cut off at 6. Needs a Python with a CUDA build of
# torch, accelerate, bitsandbytes, peft and transformers (the package itself is taken from src/).
# Output: stdout and benchmarks/results/gpu_check.txt (or $OUT/gpu_check.txt when $OUT is set).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU
#   bash benchmarks/gpu_check.sh --device cpu    # dry run on the CPU: small sizes, same code paths
set -euo pipefail
cd "$(dirname "$0")/.."
results="${OUT:-benchmarks/results}"
mkdir -p "$results"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
timeout 360 "${PYTHON:-python}" benchmarks/gpu_check.py "$@" 2>&1 | tee "$results/gpu_check.txt"
