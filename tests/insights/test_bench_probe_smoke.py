"""Smoke test of ``bench/intelligence.py --quick --parts probe_curve``: the probe-accuracy curve runs
end to end and reports, per number of labels, both estimators, the majority class, scikit-learn's
cross-validated logistic regression and the default protocol's cross-validated estimate. No
timing or accuracy thresholds beyond "the figures are accuracies"."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

BENCH = str(REPO / "bench" / "intelligence.py")


def test_bench_probe_curve_quick_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, BENCH, "--quick", "--parts", "probe_curve", "--json", str(out)]
    # no PYTHONPATH: the script puts the repository first itself (a bench file would shadow
    # the pipeline package if the bench folder came first)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["probe_curve"]
    assert "error" not in res, res
    assert res["dim"] == 16 and res["test_rows"] == 300
    assert sorted(res["mean_accuracy"], key=int) == ["20", "60"]
    for n, row in res["mean_accuracy"].items():
        assert set(row) == {"majority", "linear", "mlp", "sklearn_logistic_cv", "cv_estimate"}, n
        assert all(0.0 <= v <= 1.0 for v in row.values()), row
    for p in res["points"]:
        assert p["linear"]["C"] > 0 and p["mlp"]["epochs"] >= 1 and p["linear"]["fit_s"] >= 0
        lo, hi = p["cv_estimate"]["ci95"]
        assert lo <= p["cv_estimate"]["accuracy"] <= hi
