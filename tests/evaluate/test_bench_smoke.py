"""Smoke test of ``bench/evaluate.py --quick``: it renders its set, evaluates beat and genre end to
end in its own Ray cluster and reports every figure (no timing thresholds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO
from tests.evaluate.conftest import needs_render


@needs_render
def test_bench_evaluate_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "evaluate.py"), "--quick", "--max-epochs", "10",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=REPO, check=False)  # fmt: skip
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    r = json.loads(out.read_text())
    assert [t["task"] for t in r["tasks"]] == ["beat", "genre"] and r["config"]["quick"]
    for t in r["tasks"]:
        assert (
            t["tracks"] == 8
            and t["layers"] == 4
            and t["wall_s"] > 0
            and t["features_s"] > 0
            and t["probe_s"] > 0
        )
        assert 0 < t["features_share"] + t["probe_share"] <= 1.0 and t["best_layer"].startswith("layer_")
    assert r["peak_rss_mb_driver"] > 0 and "driver peak RSS" in proc.stdout
