#!/usr/bin/env bash
# Runs the whole test suite (the README's test command calls this after installing), in one
# process by default. MUSICFM_TEST_WORKERS=N runs it in N pytest-xdist workers, each with its own
# Ray cluster: on a 2-core machine two workers were not faster and made the node-loss test's timing
# fail (README, "Tests and benchmarks"), so they are for machines with more cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export RAY_ACCEPT_CLUSTER_SPAWN=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
WORKERS=${MUSICFM_TEST_WORKERS:-0}
"$PY" -c "import xdist" 2>/dev/null || WORKERS=0  # pytest-xdist comes with the dev extras
PARALLEL=()
[ "$WORKERS" -gt 0 ] && PARALLEL=(-n "$WORKERS" --dist worksteal)
exec "$PY" -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 "${PARALLEL[@]}" "$@"
