#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extras. Idempotent.
# --no-compile: a module is byte-compiled when first imported, not all of torch at install (about a minute less).
# TORCH_SPEC pins torch/torchvision (the CPU-tested pair by default); set it empty to let pip choose.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check $TORCH_SPEC -e ".[dev]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import align, pipelines, rewards, torch, diffusers" \
  || { echo "setup failed: the project does not import" >&2; exit 1; }
