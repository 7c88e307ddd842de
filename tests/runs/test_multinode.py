"""Multi-node Ray and the loss of a node mid-run.

In a subprocess (the test session has its own local Ray; one Ray per process), a real
multi-node cluster on this machine (``ray.cluster_utils.Cluster``): a head without CPUs (so
every decode actor runs on a worker node), two CPU worker raylets of 2 CPUs each and a "GPU"
worker (1 CPU, 1 declared GPU) for the model actor. The embed job joins it through
``RAY_ADDRESS`` as under ``ray job submit``. Once a decode actor is working on a CPU worker,
that node is removed without warning (its raylet and every worker process on it killed, its
objects lost), as a spot node is reclaimed; the other CPU worker has room for the lost decoder,
as an autoscaled pool would. The job must finish with every good track exactly once in
``tracks.lance`` and all of its windows (:func:`tools.testkit.stores.check_consistent`), the
broken file as the one error.

The head runs with the health checks of :data:`pipeline.flow.health.NODE_HEALTH_CHECKS`, the
ones every head under infra/ and the local cluster of a job are given (node death detected in
~1.5 s): with Ray's default health checks the lost decoder's in-flight tasks spend their retries
before the node is declared dead and the run stops (to be rerun); see docs/scale.md.
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
from tools.testkit.stores import check_consistent, write_catalog, write_tone

DRIVER = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from pathlib import Path

    from ray.cluster_utils import Cluster

    catalog, store, after_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    from pipeline.flow.health import NODE_HEALTH_CHECKS

    # the head's health checks as infra/ sets them (pipeline/flow/health.py): ~1.5 s to a dead node
    fast = dict(NODE_HEALTH_CHECKS)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "num_gpus": 0, "_system_config": fast})
    cpu_nodes = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
    cluster.add_node(num_cpus=1, num_gpus=1)  # the model actor's node
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address

    from pipeline.runs.embed import run_embed
    from tools.testkit.stores import embed_job

    removed = {}

    def decode_node():
        # a CPU worker node running a decode actor, and that node's live actors
        import ray._private.state  # the actor table (the public state API needs the dashboard)

        table = [a for a in ray._private.state.actors().values() if a.get("State") == "ALIVE"]
        for node in cpu_nodes:
            here = sorted(str(a.get("ActorClassName")) for a in table
                          if (a.get("Address") or {}).get("NodeID") == node.node_id)
            if any("DecodeStage" in a for a in here):
                return node, here
        return None, []

    def preempt() -> None:
        # once a decode actor works on a CPU worker node, kill that node without warning
        # (raylet, worker processes, its objects), as a spot node is reclaimed
        import ray

        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:
            time.sleep(0.1)
            if not ray.is_initialized() or decode_node()[0] is None:
                continue
            time.sleep(after_s)
            node, removed["actors"] = decode_node()
            if node is None:  # the decoders finished meanwhile
                return
            cluster.remove_node(node, allow_graceful=False)
            removed["after_s"] = round(time.monotonic() - t0, 2)
            return

    th = threading.Thread(target=preempt, daemon=True)
    th.start()
    job = embed_job(catalog, store, decode_cpus=2, gpu_actors=1, batch_size=4)
    report = run_embed(job, progress=False)
    th.join(timeout=1)
    print("RESULT " + json.dumps({"status": report.status, "ok": report.tracks_ok,
                                  "failed": report.tracks_failed, "removed": removed,
                                  "restarts": report.extra.get("actor_restarts"),
                                  "wall_s": round(report.wall_s, 2)}), flush=True)
    import ray

    ray.shutdown()
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


def _run(tmp_path: Path, n: int, seconds: float, after_s: float, timeout_s: float) -> dict:
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
        [sys.executable, "-c", DRIVER, catalog, str(store), str(after_s)],
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
    assert res["removed"].get("after_s"), f"no node was removed (the decoders ended first): {res}"
    assert any("DecodeStage" in a for a in res["removed"]["actors"]), res
    assert res["restarts"]["decode"] >= 1, res  # the lost decoder came back on the other node
    assert res["status"] == "ok" and res["ok"] == len(good) and res["failed"] == 1, res
    got = check_consistent(store)  # each track once, all of its windows, no orphans
    assert sorted(got["tracks"]) == sorted(good)
    for tid in good:
        assert got["tracks"][tid]["num_windows"] == int(seconds)
    return res


def test_worker_node_lost_mid_run(tmp_path: Path) -> None:
    """40 tracks of 20 s; a CPU worker node is removed a tenth of a second after a decode actor
    starts on it (decoding is fast: the tracks are long enough for it to last past that on an idle
    machine); every good track lands exactly once, the broken one is an error."""
    _run(tmp_path, n=40, seconds=20.0, after_s=0.1, timeout_s=240)


@pytest.mark.slow
def test_worker_node_lost_mid_run_long(tmp_path: Path) -> None:
    """The long variant: 200 tracks of 8 s, the node removed 5 s into its decoding."""
    _run(tmp_path, n=200, seconds=8.0, after_s=5.0, timeout_s=900)
