#!/usr/bin/env bash
# Set up .venv and run the whole test suite: lint, the default suite, then the slow end-to-end suites.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${RT_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/ruff" check .
# pytest exits 5 when it collects no test: that fails this script (set -e), as it should.
"$VENV/bin/python" -m pytest "$@"
"$VENV/bin/python" -m pytest -m slow "$@"
