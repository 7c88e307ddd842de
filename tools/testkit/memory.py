"""Peak Python allocations of one call, measured with tracemalloc in a fresh interpreter.

Never in the pytest process: on CPython 3.11, `tracemalloc.stop()` races with native threads that
allocate through the traced allocators (Ray's core worker, Arrow's and fsspec's I/O threads;
CPython gh-128679, fixed only in 3.12+), and one CI run died of SIGSEGV there. The child has none
of those threads, never calls `stop()`, and leaves through `os._exit`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

from tools.testkit.paths import REPO

_WRAPPER = """
import json, os, tracemalloc
{setup}
tracemalloc.start()
result = {expr}
_, peak = tracemalloc.get_traced_memory()
print(json.dumps({{"peak": peak, "result": result}}), flush=True)
os._exit(0)
"""


def traced_peak(setup: str, expr: str, timeout_s: float = 120) -> tuple[int, Any]:
    """Runs `setup` (imports, untraced), then evaluates `expr` with tracemalloc on; returns the
    peak traced bytes and the JSON-serialisable value of `expr`."""
    code = _WRAPPER.format(setup=textwrap.dedent(setup), expr=expr)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if proc.returncode != 0:
        raise AssertionError(f"traced child failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(out["peak"]), out["result"]
