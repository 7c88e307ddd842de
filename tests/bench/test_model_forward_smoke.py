"""Smoke test of bench/model_forward.py: --quick with the small golden config runs, prints its tables
and writes a JSON with every figure. No timing assertions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from musicfm import MusicFMConfig
from tests.conftest import GOLDEN, REPO, SHARED

BENCH = REPO / "bench" / "model_forward.py"


def test_quick_run_prints_tables_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "MUSICFM_SHARED": str(SHARED)}
    cmd = [sys.executable, str(BENCH), "--quick", "--config", str(GOLDEN / "config.json"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    text = proc.stdout

    # the readable report
    for heading in ("Throughput", "Breakdown (fp32, batch 1", "Breakdown (bf16, batch 1", "Drift vs fp32"):
        assert heading in text, heading
    assert (
        "precision  batch" in text and "wall x RT" in text and "x RT per CPU-s" in text and "peak MB" in text
    )
    assert "conformer" in text and "frontend" in text and "mel" in text
    assert "max abs" in text and "rel L2" in text

    # the figures
    res = json.loads(out.read_text())
    cfg = MusicFMConfig.from_json(GOLDEN / "config.json")
    meta = res["meta"]
    assert meta["quick"] is True and meta["device"] == "cpu"
    assert (
        meta["config"]["encoder_dim"] == cfg.encoder_dim
        and meta["config"]["encoder_depth"] == cfg.encoder_depth
    )
    assert (meta["seconds"], meta["samples"], meta["tokens"]) == (10.0, 240000, cfg.num_tokens(240000))
    assert meta["precisions"] == ["fp32", "bf16"] and meta["batches"] == [1]
    assert meta["clip"].startswith(str(SHARED / "audio" / "clips"))
    assert meta["threads"] >= 1 and meta["model_id"].startswith("random-")

    rows = res["throughput"]
    assert [(r["precision"], r["batch"]) for r in rows] == [("fp32", 1), ("bf16", 1)]
    for r in rows:
        assert len(r["times_s"]) == 1 and r["audio_seconds"] == 10.0
        for key in ("median_s", "best_s", "xrt", "xrt_best", "cpu_s", "cpu_util", "xrt_per_cpu_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        # each figure is what its name says
        assert math.isclose(r["xrt"], r["audio_seconds"] / r["median_s"], rel_tol=1e-9)
        assert math.isclose(r["xrt_per_cpu_s"], r["audio_seconds"] / r["cpu_s"], rel_tol=1e-9)
        assert math.isfinite(r["peak_mem_mb"]) and r["peak_total_mb"] > 0

    assert [b["precision"] for b in res["breakdown"]] == ["fp32", "bf16"]
    for b in res["breakdown"]:
        assert set(b["stages_s"]) == set(b["stages_cpu_s"]) == {"mel", "frontend", "conformer"}
        assert b["share_of"] == "cpu" and b["total_cpu_s"] > 0
        assert math.isclose(sum(b["share"].values()), 1.0, rel_tol=1e-6)

    drift = res["drift"]
    assert drift["reference"] == "fp32" and list(drift["precisions"]) == ["bf16"]
    layers = drift["precisions"]["bf16"]
    assert [d["layer"] for d in layers] == list(range(cfg.encoder_depth + 1))
    for d in layers:
        assert 0 < d["max_abs"] < d["ref_abs_max"] and 0 < d["rel_l2"] < 0.5  # bf16 differs, but not wildly
        assert 0.9 < d["cos_mean_pool"] <= 1.0 + 1e-9
