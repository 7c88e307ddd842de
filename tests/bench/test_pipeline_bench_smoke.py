"""Smoke test of ``bench/pipeline_bench.py --quick``: it runs end to end and reports every figure.

No timing thresholds (the goals are for the benchmark's own report): only that the JSON has the
fields and that every throughput is positive. The benchmark starts its own local Ray cluster in the
subprocess (``address="local"``), so it neither needs nor disturbs the session's cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import GOLDEN, REPO

BENCH = str(REPO / "bench" / "pipeline_bench.py")


def test_bench_pipeline_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [
            sys.executable,
            BENCH,
            "--quick",
            "--model-config",
            str(GOLDEN / "config.json"),
            "--audio-dir",
            str(tmp_path / "audio"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=480,
        env=env,
        cwd=tmp_path,  # from outside the repository
        check=False,
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "pipeline / model-only" in proc.stdout and "data plane per core" in proc.stdout

    r = json.loads(out.read_text())
    for key in ("config", "audio", "model_only", "pipeline", "dataplane_inprocess", "dataplane_ray", "goals"):
        assert key in r, key
    c = r["config"]
    assert c["quick"] is True and c["model"] == "small" and c["tracks"] == 4 and c["cpus"] >= 1
    assert r["audio"]["files"] == 4 and r["audio"]["audio_s"] > 0

    mo = r["model_only"]
    assert mo["windows"] == 4 and mo["wall_s"] > 0 and mo["x_realtime"] > 0 and mo["torch_threads"] >= 1

    pl = r["pipeline"]
    assert pl["status"] == "ok" and pl["tracks_ok"] == 4 and pl["tracks_failed"] == 0 and pl["windows"] == 4
    assert abs(pl["audio_s"] - mo["audio_s"]) < 0.01 * mo["audio_s"]  # the same audio on both sides
    assert pl["x_realtime"] > 0 and pl["x_realtime_net"] >= pl["x_realtime"] and pl["report_x_realtime"] > 0
    assert pl["ray_init_s"] > 0 and pl["model_load_s"] > 0 and "decode+model" in pl["stage_s"]

    dpi = r["dataplane_inprocess"]
    assert dpi["files"] == 4 and dpi["windows"] == 4
    assert dpi["x_realtime_wall"] > 0 and dpi["x_realtime_per_core"] > 0
    assert set(dpi["per_format_x_realtime_per_core"]) == {"flac", "ogg", "wav"}
    assert all(v > 0 for v in dpi["per_format_x_realtime_per_core"].values())

    dpr = r["dataplane_ray"]
    assert dpr["tracks"] == 4 and dpr["tracks_ok"] == 4 and dpr["windows"] == 4 and dpr["errors"] == 0
    assert dpr["x_realtime"] > 0 and dpr["x_realtime_per_core"] > 0 and dpr["ray_cpus"] >= 1

    for name in ("ratio_report", "ratio_net", "dp_inprocess", "dp_ray"):
        g = r["goals"][name]
        assert g["value"] > 0 and g["goal"] > 0 and isinstance(g["met"], bool), name
