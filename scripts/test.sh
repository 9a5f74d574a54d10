#!/usr/bin/env bash
# Sets up .venv and runs the test suite: the slow-marked tests first (skipped with RUN_SLOW=0),
# then the default set, whose summary is the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ "${RUN_SLOW:-1}" = "1" ]; then
  .venv/bin/python -m pytest -q -m slow "$@" || { rc=$?; [ "$rc" = 5 ] || exit "$rc"; }
fi
.venv/bin/python -m pytest -q -m "not slow" "$@"
