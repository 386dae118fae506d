#!/usr/bin/env bash
# Try lvit on the newest releases of its stack (not run by CI): a fresh .venv-newest with every dependency at
# its newest release within pyproject.toml's ranges (torch stays on its CPU build, constraints-cpu.txt), then
# the test suite. A break here is found before users meet it; once it passes, refresh constraints.txt from
# .venv-newest (see the comment at the top of constraints.txt). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .venv-newest
"$PY" -m venv .venv-newest
.venv-newest/bin/python -m pip install -q --upgrade pip
.venv-newest/bin/python -m pip install -q -c constraints-cpu.txt torch
.venv-newest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c constraints-cpu.txt -e ".[dev]"
bash scripts/get_llama_cpp.sh .venv-newest
.venv-newest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|accelerate|bitsandbytes|datasets|typer) '
.venv-newest/bin/python -m pytest -q "$@"
