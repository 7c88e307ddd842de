#!/usr/bin/env bash
# Runs the whole test suite (the README's test command calls this after installing), in
# MUSICFM_TEST_WORKERS (default 2) pytest-xdist processes: most tests wait on Ray, subprocesses
# and files more than they compute, so two workers finish a 2-core machine's suite in well under
# the time of one (README, "Tests and benchmarks"). MUSICFM_TEST_WORKERS=0 runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export RAY_ACCEPT_CLUSTER_SPAWN=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
WORKERS=${MUSICFM_TEST_WORKERS:-2}
"$PY" -c "import xdist" 2>/dev/null || WORKERS=0  # pytest-xdist comes with the dev extras
PARALLEL=()
[ "$WORKERS" -gt 0 ] && PARALLEL=(-n "$WORKERS" --dist worksteal)
exec "$PY" -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 "${PARALLEL[@]}" "$@"
