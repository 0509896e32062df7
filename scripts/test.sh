#!/usr/bin/env bash
# Runs the whole test suite (sets up .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
# Two worker processes (pytest-xdist), a test file per worker at a time: most of a test's time is Python
# (Dynamo tracing, compiling), one core each, so the default suite took 10.5 instead of 19.5 min on this project's
# 2-core machine (same 933 tests, 2026-12-01). One intra-op thread per worker: two workers with two threads each
# would oversubscribe the two cores. MMACCEL_TEST_WORKERS=0 runs in one process; a later -n in "$@" wins.
WORKERS="${MMACCEL_TEST_WORKERS:-2}"
if [ "$WORKERS" != "0" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  exec python -m pytest -n "$WORKERS" --dist loadfile "$@"  # pyproject testpaths: tests/
fi
exec python -m pytest "$@"
