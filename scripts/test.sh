#!/usr/bin/env bash
# Sets up .venv and runs the test suite, the slow-marked tests (skipped with RUN_SLOW=0) and the default set
# in one session, whose summary is the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# the demo's browser test drives Debian's chromium (headless); install it where we may
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: the browser test will be skipped" >&2
fi
# one pytest session, one pytest-xdist worker per core (TEST_WORKERS=1: in this process): the slow tests
# spread one by one, a default-set file's tests stay in one worker (they share module fixtures), a file
# marked with an xdist_group (shared fixture, fixed ports) stays in one worker, and the longest work starts
# first (tests/conftest.py); RUN_SLOW=0 leaves the slow tests out
workers="${TEST_WORKERS:-auto}"
parallel=() select=()
if [ "$workers" != "1" ]; then
  parallel=(-n "$workers" --dist loadgroup --no-loadscope-reorder)
fi
if [ "${RUN_SLOW:-1}" != "1" ]; then
  select=(-m "not slow")
fi
.venv/bin/python -m pytest -q "${select[@]}" "${parallel[@]}" "$@"
