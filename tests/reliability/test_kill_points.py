"""A driver SIGKILLed at named points (pipeline/faults.py ``MUSICFM_KILL_AT``) leaves exactly the
promised state: committed chunks intact, nothing half-visible; the same command run again finishes
with every good track exactly once, and the tracks committed before a kill are not re-embedded.

One store goes through the kills in order (each run resumes the last one):
before the first commit -> after a chunk's data files are written, before its commit -> right after
the commit of a chunk -> during maintenance -> a run to the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.faults import KILL_ENV
from tests.conftest import REPO
from tools.testkit.reliability import CKPT, JOB, STATS, check_store, store_tables, write_catalog, write_tracks

CHUNK = 2
N_TRACKS = 8


def _run(ray_cluster, cat: Path, store: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    cmd = [sys.executable, JOB, "--catalog", str(cat), "--output", str(store), "--checkpoint", CKPT,
           "--stats", STATS, "--layers", "1,3", "--window-s", "1", "--chunk-size", str(CHUNK),
           "--no-progress"]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def _committed(store: Path) -> dict:
    tables = store_tables(str(store))
    if tables["tracks"] is None or tables["tracks"].num_rows == 0:
        return {"tables": tables, "ids": set(), "runs": []}
    check_store(tables)  # every committed track whole (all windows, finite), no duplicates
    runs = tables["runs"].to_pylist() if tables["runs"] is not None else []
    return {"tables": tables, "ids": set(tables["tracks"]["track_id"].to_pylist()), "runs": runs}


def _vectors(tables: dict) -> dict[str, tuple[str, np.ndarray]]:
    t = tables["tracks"]
    return {r["track_id"]: (r["run_id"], np.asarray(r["layer_3"], np.float32)) for r in t.to_pylist()}


def test_driver_killed_at_each_named_point(ray_cluster, tmp_path) -> None:
    names = write_tracks(tmp_path / "audio", N_TRACKS, seconds=2.0)
    cat = write_catalog(tmp_path / "catalog.csv", [{"track_id": k, "uri": f"audio/{v}"} for k, v in names.items()],
                        ["track_id", "uri"])  # fmt: skip
    store = tmp_path / "store"

    r = _run(ray_cluster, cat, store, "planned")  # before the first commit
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _committed(store)["ids"] == set()

    r = _run(ray_cluster, cat, store, "chunk_written:1")  # chunk 1's files written, not committed
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    got = _committed(store)
    assert len(got["ids"]) % CHUNK == 0 and len(got["ids"]) < N_TRACKS  # whole chunks only
    assert not [x for x in got["runs"] if x["kind"] == "embed"], "no run row for a killed run"

    r = _run(ray_cluster, cat, store, "chunk_done:1")  # right after chunk 1's commit
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    got2 = _committed(store)
    assert got["ids"] <= got2["ids"] and len(got2["ids"]) % CHUNK == 0 and len(got2["ids"]) >= 2 * CHUNK
    before = _vectors(got2["tables"])

    if len(got2["ids"]) < N_TRACKS:  # maintenance comes after the last chunk: reach it
        r = _run(ray_cluster, cat, store, "maintenance_compacted")
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        got3 = _committed(store)
        assert got3["ids"] == set(names), "every chunk was committed before maintenance"
        assert not [x for x in got3["runs"] if x["kind"] == "embed"]

    r = _run(ray_cluster, cat, store, None)  # the same command, to the end
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    final = store_tables(str(store))
    check_store(final, expect_tracks=names)
    after = _vectors(final)
    for tid, (run_id, vec) in before.items():  # committed before a kill: intact, not re-embedded
        assert after[tid][0] == run_id
        np.testing.assert_array_equal(after[tid][1], vec)
    ok_runs = [x for x in final["runs"].to_pylist() if x["status"] == "ok"]
    assert len(ok_runs) == 1 and ok_runs[0]["tracks_failed"] == 0
