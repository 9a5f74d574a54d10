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
# one pytest-xdist worker per core (TEST_WORKERS=N chooses, 1: in this process). The default set keeps a
# file's tests in one worker (they share module fixtures); the slow set spreads its long independent tests,
# and a file marked with an xdist_group (shared fixture, fixed ports) stays in one worker. Both hand out the
# longest files first (tests/conftest.py: START_FIRST), so the workers finish together
workers="${TEST_WORKERS:-auto}"
slow_parallel=() default_parallel=()
if [ "$workers" != "1" ]; then
  slow_parallel=(-n "$workers" --dist loadgroup --no-loadscope-reorder)
  default_parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
if [ "${RUN_SLOW:-1}" = "1" ]; then
  .venv/bin/python -m pytest -q -m slow "${slow_parallel[@]}" "$@" || { rc=$?; [ "$rc" = 5 ] || exit "$rc"; }
fi
.venv/bin/python -m pytest -q -m "not slow" "${default_parallel[@]}" "$@"
