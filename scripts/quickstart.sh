#!/usr/bin/env bash
# Sets up .venv and fine-tunes the embedded default (a small text-to-image flow model) with
# Flow-GRPO on the CPU; ends with "reward before=<x> after=<y>" and writes before/after grids.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/align train flow_grpo --config configs/quickstart.yaml "$@"
