"""A model change keeps search whole (pipeline/store/snapshots.py): a store embedded with model A
is migrated to model B by a refresh that is SIGKILLed in the middle; meanwhile every query answers
over the whole catalog from A alone; the rerun resumes and switches search to B in one commit; A
stays queryable (--keep-previous); a rollback returns the store to A.

Real Ray, real Lance (tags), the real small checkpoint (A) and a random-weight model of the same
size (B), real audio files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pytest

from pipeline.faults import KILL_ENV
from pipeline.runs.embed import run_embed
from pipeline.runs.settings import EmbedJob
from pipeline.search.reader import TrackQuery, open_store
from tests.conftest import GOLDEN, REPO
from tools.testkit.reliability import CKPT, STATS, write_catalog, write_tracks

N = 6
B_ARGS = ["--checkpoint", "random:1", "--model-config", str(GOLDEN / "config.json")]
COMMON = ["--layers", "1,3", "--window-s", "1", "--precision", "fp32", "--chunk-size", "2", "--no-progress"]


def _refresh(ray_cluster, cat: Path, store: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    cmd = [sys.executable, str(REPO / "jobs" / "refresh_catalog.py"), "--catalog", str(cat), "--store", str(store),
           *B_ARGS, *COMMON]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def _answers_whole_from_one_model(store: Path, model: str | None = None) -> tuple[str, str]:
    """Every query over the whole catalog from exactly one model: (that model, the snapshot)."""
    reader = open_store(str(store), model=model)
    assert reader.num_tracks == N and len(reader.model_ids) == 1, (reader.num_tracks, reader.model_ids)
    ids = reader._tracks.to_table(columns=["track_id"])["track_id"].to_pylist()  # noqa: SLF001
    for tid in ids:
        hits = reader.search(TrackQuery(tid), layer=3, k=N - 1)
        assert sorted(h.track_id for h in hits) == sorted(set(ids) - {tid})
    return reader.model_ids[0], reader.snapshot


def _vectors(store: Path, model: str | None = None) -> dict[str, np.ndarray]:
    t = open_store(str(store), model=model)._tracks.to_table(columns=["track_id", "layer_3"])  # noqa: SLF001
    return {r["track_id"]: np.asarray(r["layer_3"]) for r in t.to_pylist()}


def test_a_model_change_keeps_search_whole_and_rolls_back(ray_cluster, tmp_path) -> None:
    names = write_tracks(tmp_path / "audio", N, seconds=2.0)
    cat = write_catalog(tmp_path / "catalog.csv", [{"track_id": k, "uri": f"audio/{v}"} for k, v in names.items()],
                        ["track_id", "uri"])  # fmt: skip
    store = tmp_path / "store"
    job = EmbedJob(catalog=str(cat), output=str(store), checkpoint=CKPT, stats=STATS, layers=(1, 3),
                   window_s=1.0, hop_s=1.0, precision="fp32", batch_size=8, decode_cpus=1)  # fmt: skip
    a = run_embed(job, progress=False, chunk_size=2)
    assert a.status == "ok"
    model_a, snap = _answers_whole_from_one_model(store)
    assert snap == "latest" and model_a == a.model_id
    vec_a = _vectors(store)

    r = _refresh(ray_cluster, cat, store, kill_at="chunk_done:0")  # model B, killed mid-migration
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    latest = lance.dataset(str(store / "tracks.lance")).to_table(columns=["model_id"])
    assert len(set(latest["model_id"].to_pylist())) == 2, "the live table is half migrated"
    assert _answers_whole_from_one_model(store) == (model_a, "migration in progress")

    r = _refresh(ray_cluster, cat, store)  # the same command: resumes, then switches
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    model_b, snap = _answers_whole_from_one_model(store)
    assert model_b != model_a and snap == "latest"
    assert _answers_whole_from_one_model(store, model=model_a) == (model_a, f"run {a.run_id}")
    for tid, v in _vectors(store, model=model_a).items():  # the kept run is A's, unchanged
        np.testing.assert_array_equal(v, vec_a[tid])

    with pytest.raises(Exception, match="no kept run of model nope"):
        open_store(str(store), model="nope")

    r = subprocess.run([sys.executable, str(REPO / "jobs" / "rollback_store.py"), "--store", str(store)],
                       cwd=REPO, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"back at run {a.run_id}" in r.stdout
    assert _answers_whole_from_one_model(store) == (model_a, "latest")
    for tid, v in _vectors(store).items():
        np.testing.assert_array_equal(v, vec_a[tid])
    kinds = lance.dataset(str(store / "runs.lance")).to_table(columns=["kind", "status"]).to_pylist()
    assert kinds[-1] == {"kind": "rollback", "status": "ok"}
