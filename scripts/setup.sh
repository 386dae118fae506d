#!/usr/bin/env bash
# Set up a CPU development environment in .venv: torch pinned to its CPU build through
# constraints-cpu.txt (so no other package can pull a CUDA build), then lvit with its dev tools.
# On a GPU machine, install torch for your CUDA first and then `pip install -e ".[dev]"` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
echo "lvit is installed in .venv (activate with: . .venv/bin/activate)"
