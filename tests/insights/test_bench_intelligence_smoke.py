"""Smoke test of the crops part of ``bench/intelligence.py --quick``: real clips cropped and
embedded with the golden model in a subprocess (its own local Ray cluster), every figure reported.
No thresholds on the figures: they are the benchmark's report (docs/insights.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, SHARED

BENCH = str(REPO / "bench" / "intelligence.py")


def test_crops_part_quick_reports_recall_by_length(tmp_path) -> None:
    out = tmp_path / "bench.json"
    # no PYTHONPATH: the script puts the repository first on sys.path itself (with the script's
    # folder first, bench/pipeline_bench.py would shadow the pipeline package)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", MUSICFM_SHARED=str(SHARED))
    cmd = [sys.executable, BENCH, "--quick", "--parts", "crops", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["crops"]
    assert "error" not in res, res
    assert res["tracks"] == 12 + 2 * 2 + 2  # clips, 2 sources x 2 lengths, 2 lead-ins
    for key in ("layer1_aligned", "layer1_track_vectors", "layer3_aligned", "layer3_track_vectors"):
        fig = res[key]
        assert set(fig["recall_by_fraction"]) == {"0.20", "0.50", "lead-in"}, fig
        assert all(0.0 <= v <= 1.0 for v in fig["recall_by_fraction"].values())
        assert fig["copies"] == 6 and fig["false_merges"] >= 0
    assert res["layer1_aligned"]["aligned_pairs"] > 0 and res["layer1_track_vectors"]["aligned_pairs"] == 0
