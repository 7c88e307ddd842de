#!/usr/bin/env bash
# One command on a machine with a CUDA GPU: model-only x realtime per GPU (fp32 / bf16 / fp16 x batch
# 8 / 32 / 64, eager and torch.compile), MFU from the counted FLOPs, peak memory, SDPA kernels, the
# model stage's overlapped path, and the pipeline's GPU busy fraction with N decode CPUs.
# Extra flags go to bench/gpu.py (e.g. --no-compile, --decode-cpus 4,8,15, --json out.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu.sh: error: no CUDA device visible to torch ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null || echo 'torch not importable')); run it on a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export RAY_USAGE_STATS_ENABLED=0 RAY_ACCEPT_CLUSTER_SPAWN=1
"$PY" bench/flops.py --device cuda
exec "$PY" bench/gpu.py "$@"
