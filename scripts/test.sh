#!/usr/bin/env bash
# Runs the whole test suite (the README's test command calls this after installing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export RAY_ACCEPT_CLUSTER_SPAWN=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
exec "$PY" -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 "$@"
