#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then fine-tune the real all-MiniLM-L6-v2 briefly and merge it
# back with its base (examples/offline_merge.py). Usage: bash scripts/demo.sh [--out DIR] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${RT_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" examples/offline_merge.py "$@"
