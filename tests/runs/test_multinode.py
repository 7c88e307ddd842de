"""Multi-node Ray and the loss of a node mid-run.

In a subprocess (the test session has its own local Ray; one Ray per process), a real
multi-node cluster on this machine (``ray.cluster_utils.Cluster``: a head without CPUs, so every
decode actor runs on a worker node, and two worker raylets with their own resources: 2 CPUs, and
2 CPUs + 1 declared GPU). The embed job joins it through ``RAY_ADDRESS`` as under ``ray job
submit``. As soon as the first data file of the run is written, the CPU-only worker node is
removed (its raylet and every worker process on it killed, its objects lost); the job must
finish with every good track exactly once in ``tracks.lance`` and all its windows
(:func:`tests.support.stores.check_consistent`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.support.stores import check_consistent, write_catalog, write_tone

DRIVER = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from pathlib import Path

    from ray.cluster_utils import Cluster

    catalog, store, kill_after_files = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    cpu_node = cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address

    from pipeline.runs.embed import run_embed
    from tests.support.stores import embed_job

    removed = {}

    def remove_when_started() -> None:
        data = Path(store) / "windows.lance" / "data"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            if data.is_dir() and len(list(data.iterdir())) >= kill_after_files:
                cluster.remove_node(cpu_node, allow_graceful=False)
                removed["after_s"] = round(time.monotonic() - t0, 2)
                return
            time.sleep(0.05)

    th = threading.Thread(target=remove_when_started, daemon=True)
    th.start()
    job = embed_job(catalog, store, decode_cpus=2, gpu_actors=1, batch_size=4)
    report = run_embed(job, progress=False)
    th.join(timeout=1)
    print("RESULT " + json.dumps({"status": report.status, "ok": report.tracks_ok,
                                  "failed": report.tracks_failed, "removed": removed,
                                  "restarts": report.extra.get("actor_restarts"),
                                  "wall_s": round(report.wall_s, 2)}), flush=True)
    cluster.shutdown()
    """
)


def _library(tmp_path: Path, n: int, seconds: float) -> tuple[str, list[str]]:
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = []
    for i in range(n):
        tid = f"mn{i:03d}"
        rows.append((tid, write_tone(audio / f"{tid}.wav", seconds, 180.0 + 7 * i), f"T{i}"))
    (audio / "broken.wav").write_bytes(b"RIFF not audio")
    rows.append(("broken", str(audio / "broken.wav"), "bad"))
    return write_catalog(tmp_path / "catalog.csv", rows), [r[0] for r in rows[:-1]]


def _run(tmp_path: Path, n: int, seconds: float, kill_after_files: int, timeout_s: float) -> dict:
    catalog, good = _library(tmp_path, n, seconds)
    store = tmp_path / "store"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_ACCEPT_CLUSTER_SPAWN": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, catalog, str(store), str(kill_after_files)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    wall = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.returncode, proc.stdout[-3000:], proc.stderr[-6000:])
    res = json.loads(lines[-1][len("RESULT ") :])
    res["test_wall_s"] = wall
    assert res["removed"], f"the node was never removed (the run ended first): {res}"
    assert res["status"] == "ok" and res["ok"] == len(good) and res["failed"] == 1, res
    got = check_consistent(store)  # each track once, all of its windows, no orphans
    assert sorted(got["tracks"]) == sorted(good)
    for tid in good:
        assert got["tracks"][tid]["num_windows"] == int(seconds)
    return res


def test_worker_node_lost_mid_run(tmp_path: Path) -> None:
    """40 tracks of 4 s on a 3-node cluster; the CPU worker node is removed once the first
    data file is written; every good track lands exactly once, the broken one is an error."""
    _run(tmp_path, n=40, seconds=4.0, kill_after_files=1, timeout_s=240)


@pytest.mark.slow
def test_worker_node_lost_mid_run_long(tmp_path: Path) -> None:
    """The long variant: 200 tracks of 8 s, the node removed later in the run."""
    _run(tmp_path, n=200, seconds=8.0, kill_after_files=6, timeout_s=900)
