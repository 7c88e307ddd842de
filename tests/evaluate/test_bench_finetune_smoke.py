"""Smoke test of ``bench/finetune.py --quick``: it runs end to end and reports every figure.

No timing thresholds (figures belong to the benchmark's report): only that the JSON has the fields,
the run took its steps and the throughput is positive. It runs on the session's Ray cluster
(``RAY_ADDRESS``) so that it does not start another one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

BENCH = str(REPO / "bench" / "finetune.py")


def test_bench_finetune_quick_json(ray_cluster, tmp_path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=480, env=env, cwd=REPO, check=False)  # fmt: skip
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "audio s / s / worker" in proc.stdout
    r = json.loads(out.read_text())
    c = r["config"]
    assert c["quick"] is True and c["model"] == "small" and c["workers"] == 2 and c["clips"] == 4
    assert r["steps"] == c["steps"] == 4
    assert r["audio_s_per_s_per_worker"] > 0 and r["wall_s"] > 0
    assert r["audio_s_trained"] == 4 * 2 * 2.0 * 2
    assert r["model_id"].startswith("random-") and r["machine"]["cpus"] >= 1
