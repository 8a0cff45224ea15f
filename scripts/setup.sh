#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with everything the demo, tests and
# benchmarks need. Idempotent; safe to re-run. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RT_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
# torch first and pinned: the CPU wheel on these machines. An unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -e ".[all,test]"
"$VENV/bin/python" -c "import torch, resilient_tune; print('resilient-tune', resilient_tune.__version__, '| torch', torch.__version__)"
