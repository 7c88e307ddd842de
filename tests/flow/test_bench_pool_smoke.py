"""CI smoke of ``bench/pipeline_bench.py --quick --model mid`` (4 layers x 512 wide): the benchmark runs
the job at a size between the golden model and the released one, and the pool shape the job chose
there is the rule's (pipeline.flow.runtime: threads per model actor from the model's FLOPs per
audio second, memory declared per actor), with the cores it kept busy in the report. No timing
threshold: the ratios are the benchmark's own report (docs/sizing_decode.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_bench_pipeline_mid_size_pool_shape(tmp_path) -> None:
    from musicfm import MusicFMConfig
    from pipeline.flow.runtime import model_cost, threads_per_model_actor

    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pipeline_bench.py"), "--quick", "--model", "mid",
         "--audio-dir", str(tmp_path / "audio"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    r = json.loads(out.read_text())
    assert r["config"]["model"] == "mid" and r["model_only"]["depth"] == 4 and r["model_only"]["dim"] == 512
    pool = r["pipeline"]["pool"]
    cost = model_cost(MusicFMConfig(**json.loads(Path(r["config"]["model_config"]).read_text())), 30.0)
    assert pool["rule_threads_per_actor"] == threads_per_model_actor(cost) == 1  # 3.1 GFLOP per audio s
    assert abs(pool["gflop_per_audio_s"] - cost.gflop_per_audio_s) < 1e-6
    assert pool["actors_started"]["model"] == pool["model_actors"] >= 1
    assert pool["model_actors"] * pool["threads_per_model_actor"] <= max(r["config"]["cpus"], 1)
    assert pool["model_memory"] > cost.weight_bytes and pool["decode_memory"] > 0
    assert r["pipeline"]["busy_cores"] > 0 and "pool: " in proc.stdout and "busy cores" in proc.stdout
