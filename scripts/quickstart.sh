#!/usr/bin/env bash
# Sets up .venv and samples the embedded default model (a small text-to-image flow model on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/align sample --model toy --prompt "a red digit 7" --prompt "a blue digit 3" --num 8 --out outputs/quickstart "$@"
