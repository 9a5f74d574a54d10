#!/usr/bin/env bash
# Sets up .venv and runs the test suite (the slow marker runs after the default set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q -m "not slow" "$@"
if [ "${RUN_SLOW:-1}" = "1" ]; then
  .venv/bin/python -m pytest -q -m slow "$@" || { rc=$?; [ "$rc" = 5 ] || exit "$rc"; }
fi
