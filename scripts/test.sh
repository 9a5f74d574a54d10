#!/usr/bin/env bash
# Sets up .venv and runs the test suite: the slow-marked tests first (skipped with RUN_SLOW=0),
# then the default set, whose summary is the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# the demo's browser test drives Debian's chromium (headless); install it where we may
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: the browser test will be skipped" >&2
fi
# one pytest-xdist worker per core (TEST_WORKERS=1: in this process); a file's tests stay in one
# worker, so the ones sharing a fixture or a port never run at once
workers="${TEST_WORKERS:-auto}"
parallel=()
[ "$workers" = "1" ] || parallel=(-n "$workers" --dist loadfile)
if [ "${RUN_SLOW:-1}" = "1" ]; then
  .venv/bin/python -m pytest -q -m slow "${parallel[@]}" "$@" || { rc=$?; [ "$rc" = 5 ] || exit "$rc"; }
fi
.venv/bin/python -m pytest -q -m "not slow" "${parallel[@]}" "$@"
