#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (scripts/setup.sh), then run `resilient-tune demo`: fine-tune the
# real all-MiniLM-L6-v2 on a narrow task with a transformers Trainer and CocktailCallback, show that it forgets a
# general skill and that the resilient checkpoint brings it back (table, report.json, report.png, checkpoint).
# About 5 minutes on 2 CPU cores, offline. Usage: bash scripts/demo.sh [--out DIR] [--steps N] [--seed S]
# [--scenario decoder] (a small causal LM pre-trained in the run on English prose, then fine-tuned on Python code).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${RT_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/resilient-tune" demo "$@"
