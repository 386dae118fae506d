#!/usr/bin/env bash
# Set up a CPU development environment in .venv with the exact stack the suite passed on (constraints.txt:
# torch's CPU build, transformers, TRL, peft, accelerate, ... at pinned versions), then lvit with its dev tools.
# scripts/setup-newest.sh tries the newest releases instead. On a GPU machine, install torch for your CUDA
# first and then `pip install -e ".[dev]"` (add `-c constraints.txt` minus its torch line to get the same stack).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q pip==26.3
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
bash scripts/get_llama_cpp.sh  # llama.cpp's converter, for lvit export --gguf and its tests
echo "lvit is installed in .venv with the tested stack (activate with: . .venv/bin/activate)"
