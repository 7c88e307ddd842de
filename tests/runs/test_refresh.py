"""The refresh job end to end: real Ray (session cluster), real Lance, synthetic audio, golden model.

A module fixture builds the v1 store (one refresh into an empty store) and the *clean* result of
applying the v2 catalog to it in one uninterrupted run. The scenarios then reach v2 the hard
ways (injected failures at every commit step, a SIGKILLed subprocess racing a second refresh)
and must converge to exactly the clean store. Ray Data start-up dominates on 2 cores, so the
number of embedding passes is kept to the minimum.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from pipeline.errors import InjectedFailure
from pipeline.faults import FAIL_ENV
from pipeline.runs.plan import make_plan
from pipeline.runs.refresh import run_refresh
from pipeline.store.lease import StoreLock, holder_gone
from pipeline.store.maintenance import sweep
from pipeline.store.tables import Store
from tests.conftest import REPO
from tools.testkit.stores import (  # noqa: F401
    CKPT,
    DATA_TABLES,
    STATS,
    assert_same_store,
    check_consistent,
    refresh_job,
    run_row,
    table,
    versions,
    write_catalog,
    write_tone,
)

# --------------------------------------------------------------------------- the world


@dataclass
class World:
    root: Path
    cat_v1: str
    cat_v2: str
    store_v1: Path  # after refreshing v1 into an empty store (do not modify: copy it)
    v1_run: str
    clean_v2: Path  # v1 store + v2 catalog in one clean run

    def copy_v1(self, name: str) -> Path:
        dst = self.root / name
        shutil.copytree(self.store_v1, dst)
        return dst


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("refresh")
    audio = root / "audio"
    audio.mkdir()
    v1 = {  # track_id -> (file, seconds, freq, title)
        "a": ("a.wav", 1.2, 220.0, "Alpha"),
        "b": ("b.flac", 2.5, 330.0, "Bravo"),
        "c": ("c.ogg", 2.0, 440.0, "Charlie"),
        "o'q": ("oq.wav", 1.5, 550.0, "Quote"),  # quote in the id: delete predicates escape it
        "e": ("e.flac", 1.0, 660.0, "Echo"),
    }
    rows1 = [(tid, write_tone(audio / f, s, hz), title) for tid, (f, s, hz, title) in v1.items()]
    cat_v1 = write_catalog(root / "v1.csv", rows1)
    store_v1 = root / "store_v1"
    rep = run_refresh(refresh_job(cat_v1, str(store_v1)))
    assert rep.status == "ok" and rep.plan["new"] == 5 and rep.tracks_ok == 5, rep.summary()

    # v2: b re-encoded (content change), c retitled (metadata only), o'q removed, f new.
    time.sleep(0.01)
    write_tone(audio / "b.flac", 2.5, 350.0)
    rows2 = [r if r[0] != "c" else (r[0], r[1], "Charlie (remastered)") for r in rows1 if r[0] != "o'q"]
    rows2.append(("f", write_tone(audio / "f.ogg", 1.8, 770.0), "Foxtrot"))
    cat_v2 = write_catalog(root / "v2.csv", rows2)
    w = World(root, cat_v1, cat_v2, store_v1, rep.run_id, root / "clean_v2")
    shutil.copytree(store_v1, w.clean_v2)
    clean = run_refresh(refresh_job(cat_v2, str(w.clean_v2)))
    assert clean.status == "ok" and clean.tracks_ok == 2 and clean.deleted == 1, clean.summary()
    return w


# --------------------------------------------------------------------------- scenarios


def test_plan_kinds() -> None:
    """Classification by content version, uri, settings fingerprint and catalog metadata."""
    stored = pa.Table.from_pylist(
        [{"track_id": t, "uri": f"/m/{t}", "content_version": "v1", "settings_id": sid, "title": "T"}
         for t, sid in (("same", "S"), ("content", "S"), ("moved", "S"), ("settings", "OLD"),
                        ("meta", "S"), ("gone", "S"), ("bad", "S"))]
    )  # fmt: skip

    def row(t: str, uri: str | None = None, title: str = "T") -> dict:
        return {"track_id": t, "uri": uri or f"/m/{t}", "metadata_json": json.dumps({"title": title})}

    rows = [row("same"), row("content"), row("moved", "/n/moved"), row("settings"), row("meta", title="U"),
            row("bad"), row("new")]  # fmt: skip
    vers = {r["track_id"]: {"content_version": "v1"} for r in rows}
    vers["content"] = {"content_version": "v2"}
    vers["bad"] = {"content_version": None, "error_type": "FetchError", "message": "not found"}
    plan = make_plan(rows, stored, vers, "S", ["title"], delete_missing=True)
    kinds = {k: v for k, v in plan.samples(10).items() if v}
    assert kinds == {"new": ["new"], "changed": ["content", "moved"], "settings": ["settings"],
                     "metadata": ["meta"], "removed": ["gone"], "lookup_failed": ["bad"]}  # fmt: skip
    assert plan.unchanged == ["same"] and plan.counts()["unchanged"] == 1
    assert [r["content_version"] for r in plan.todo] == ["v1", "v2", "v1", "v1"]
    kept = make_plan(rows, stored, vers, "S", ["title"], delete_missing=False, present_ids=["x"])
    assert kept.removed == [] and kept.kept == ["gone"]


def test_chunk_completes_when_every_track_is_accounted_for() -> None:
    """The streaming refresh commits a chunk once each track's windows (ok or failed in the model)
    or its fetch/decode error have all come out of the stream, in any order and block split."""
    from pipeline.flow.streaming import Chunk

    def part(*rows: tuple) -> pa.Table:
        return pa.Table.from_pylist(
            [{"track_id": t, "kind": k, "window_ix": w, "num_windows": n} for t, k, w, n in rows]
        )

    ch = Chunk(0, expected=3)
    ch.add(part(("a", "window", 1, 3), ("b", "window", 0, 2)), ["wf1"], [])
    ch.add(part(("a", "window", 1, 3)), [], [])  # the same window again counts once
    assert not ch.complete and ch.done == set()
    ch.add(part(("c", "error", None, None), ("a", "window", 0, 3), ("b", "error", 1, 2)), ["wf2"], ["ff"])
    assert not ch.complete and ch.done == {"b", "c"}  # b: one window ok, one failed in the model
    ch.add(part(("a", "window", 2, 3)), [], [])
    assert ch.complete and ch.fragments == {"windows": ["wf1", "wf2"], "frames": ["ff"]}


def test_no_change_is_free_and_dry_run_writes_nothing(world: World) -> None:
    store = world.root / "nochange"
    shutil.copytree(world.clean_v2, store)
    before = versions(store, ("tracks", "windows", "frames", "runs", "_refresh_lock"))
    rep = run_refresh(refresh_job(world.cat_v2, str(store)))
    assert rep.status == "ok" and rep.plan["unchanged"] == 5 and rep.plan["new"] == rep.plan["changed"] == 0
    assert rep.tracks_ok == rep.windows == rep.chunks == 0
    assert "decode+model" not in rep.stage_s and "ray_init" not in rep.stage_s  # no model work at all
    assert versions(store) == {k: before[k] for k in DATA_TABLES}  # data tables not even touched
    row = run_row(store, rep.run_id)
    assert row["kind"] == "refresh" and row["status"] == "ok" and row["windows"] == 0
    assert json.loads(row["report_json"])["plan"]["unchanged"] == 5

    store = world.copy_v1("dry")
    v1 = check_consistent(store)
    before = versions(store, ("tracks", "windows", "frames", "runs", "errors", "_refresh_lock"))
    dry = run_refresh(replace(refresh_job(world.cat_v2, str(store)), dry_run=True))
    assert dry.dry_run and dry.status == "ok"
    assert {k: dry.plan[k] for k in ("new", "changed", "metadata", "unchanged", "removed")} == {
        "new": 1, "changed": 1, "metadata": 1, "unchanged": 2, "removed": 1}  # fmt: skip
    assert (
        dry.samples["new"] == ["f"] and dry.samples["removed"] == ["o'q"] and dry.samples["changed"] == ["b"]
    )
    assert "e.g. f" in dry.summary() and "nothing written" in dry.summary()
    assert versions(store, ("tracks", "windows", "frames", "runs", "errors", "_refresh_lock")) == before
    assert check_consistent(store) == v1
    # the sweep reports (never hides) a track whose windows went missing
    lance.dataset(str(store / "windows.lance")).delete("track_id = 'a'")
    assert sweep(Store(str(store))) == ({"frames": 0, "windows": 0}, ["a"], 1)
    # a dry run against a store that does not exist yet creates nothing either
    ghost = world.root / "ghost"
    assert run_refresh(replace(refresh_job(world.cat_v1, str(ghost)), dry_run=True)).plan["new"] == 5
    assert not ghost.exists()


def test_failures_at_each_commit_step_then_rerun_converge(world: World, monkeypatch) -> None:
    """Inject a failure at every step of the protocol, one run each (each run resumes the last);
    the final store equals the clean run's. Unchanged tracks are never rewritten."""
    store = world.copy_v1("chain")
    v1 = check_consistent(store)
    # an index on tracks: maintenance must fold the new rows into it
    lance.dataset(str(store / "tracks.lance")).create_scalar_index("track_id", "BTREE")
    job = refresh_job(world.cat_v2, str(store), chunk_size=1)  # todo: f (new), b (changed): one per chunk
    steps = [
        "tracks_deleted",  # o'q's track row deleted, its windows/frames not yet
        "windows_appended:0",  # f's windows appended, its track row not merged: orphans
        "chunk_done:0",  # f re-embedded and committed, b not started (between chunks)
        "tracks_merged:0",  # b merged, its superseded windows/frames not deleted yet
        "swept",  # leftovers deleted, maintenance not done yet
    ]
    # chunks complete in stream order here (writer tasks may finish out of order otherwise, and
    # "chunk 0" would not always be f): the steps below name chunks
    import ray

    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    for step in steps:
        monkeypatch.setenv(FAIL_ENV, step)
        with pytest.raises(InjectedFailure, match=step):
            run_refresh(job)
        # between runs readers see a consistent store whichever way they read it
        tracks = {t["track_id"]: t["run_id"] for t in table(store, "tracks").to_pylist()}
        win = table(store, "windows").to_pylist()
        for tid, rid in tracks.items():
            assert any(w["track_id"] == tid and w["run_id"] == rid for w in win), (step, tid)
    monkeypatch.delenv(FAIL_ENV)
    final = run_refresh(replace(job, retention_days=0.0))
    assert final.status == "ok" and final.tracks_ok == 0  # nothing left to embed
    assert_same_store(store, world.clean_v2)

    now = check_consistent(store)
    for tid in ("a", "e"):  # unchanged: row, windows and frames untouched (same run, same time)
        assert now["tracks"][tid]["run_id"] == world.v1_run == v1["tracks"][tid]["run_id"]
        assert now["tracks"][tid]["embedded_at"] == v1["tracks"][tid]["embedded_at"]
        assert {k: r["run_id"] for k, r in now["windows"].items() if k[0] == tid} == {
            k: r["run_id"] for k, r in v1["windows"].items() if k[0] == tid}  # fmt: skip
    c = now["tracks"]["c"]  # metadata only: retitled, not re-embedded
    assert c["title"] == "Charlie (remastered)" and c["run_id"] == world.v1_run
    assert now["tracks"]["b"]["run_id"] != world.v1_run and "o'q" not in now["tracks"]

    failed_rows = [r for r in table(store, "runs").to_pylist() if r["status"] == "failed"]
    assert len(failed_rows) == len(steps) and all("injected" in json.loads(r["report_json"])["reason"]
                                                   for r in failed_rows)  # fmt: skip
    row = run_row(store, final.run_id)
    rep = json.loads(row["report_json"])
    assert rep["versions"] == versions(store)  # the pins are the latest versions
    assert rep["tracks_without_windows"] == 0 and rep["chunks"] == 0
    maint = rep["maintenance"]
    assert {"tracks", "windows", "frames", "runs", "_refresh_lock"} <= set(maint)
    assert maint["windows"]["fragments_removed"] >= 2 and maint["tracks"]["old_versions_removed"] > 0
    assert maint["tracks"]["indices"] and "indices" not in maint["windows"]
    idx = lance.dataset(str(store / "tracks.lance")).describe_indices()[0]
    assert idx.num_rows_indexed == 5  # the new rows were folded into the index
    for t in DATA_TABLES:  # retention 0: the latest version, compacted, and the kept previous run's
        ds = lance.dataset(str(store / f"{t}.lance"))
        tagged = {int(x["version"]) for x in ds.tags.list().values()}
        assert len(ds.tags.list()) == 2 and ds.version in tagged  # --keep-previous 1: this run and v1
        assert {v["version"] for v in ds.versions()} == tagged and len(ds.get_fragments()) == 1


def test_sigkill_and_a_concurrent_refresh(world: World, ray_cluster) -> None:
    """A refresh subprocess is SIGKILLed after its first chunk commit; a second refresh started
    meanwhile fails fast on the lease (a live holder is never overridden); a rerun right after
    the kill takes the dead holder's lease over at once (same host, process gone) and converges."""
    store = world.copy_v1("killed")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    env.pop(FAIL_ENV, None)
    cmd = [sys.executable, str(REPO / "jobs" / "refresh_catalog.py"), "--catalog", world.cat_v2,
           "--store", str(store), "--checkpoint", CKPT, "--stats", STATS, "--layers", "1,3",
           "--precision", "fp32", "--window-s", "1", "--hop-s", "1", "--frames-hz", "5", "--decode-cpus", "1",
           "--gpu-actors", "1", "--chunk-size", "1", "--no-progress", "--log-format", "json"]  # fmt: skip
    victim = subprocess.Popen([*cmd, "--lock-ttl-s", "600"], env=env, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # keep reading: a full pipe would stall the victim (and its lease)
        assert victim.stderr is not None
        for line in victim.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    events: list[dict] = []
    second: subprocess.Popen | None = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            line = lines.get(timeout=240)
            if line is None:
                break
            if not line.startswith("{"):
                continue
            ev = json.loads(line)
            events.append(ev)
            if ev.get("step") == "lock acquired" and second is None:
                second = subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            if ev.get("step") == "chunk committed" and ev.get("chunk") == 0:
                victim.send_signal(signal.SIGKILL)
                break
    finally:
        victim.kill()
        victim.wait(timeout=60)
    assert second is not None
    _, second_err = second.communicate(timeout=120)
    assert victim.returncode == -signal.SIGKILL, events[-3:]
    assert all(e["run_id"] == events[0]["run_id"] for e in events)
    plan = next(e for e in events if e.get("step") == "plan")
    assert (plan["new"], plan["changed"], plan["removed"]) == (1, 1, 1)
    assert second.returncode == 4, second_err[-2000:]
    assert "being refreshed by run " + events[0]["run_id"] in second_err

    lock = StoreLock(Store(str(store)), "probe")
    held = lock.holder()
    assert held is not None and held["holder"] == events[0]["run_id"]  # unexpired (TTL 600 s) ...
    assert holder_gone(held) is not None  # ... but its process is gone: proven dead
    t0 = time.monotonic()
    rerun = run_refresh(refresh_job(world.cat_v2, str(store), chunk_size=1))  # at once, no TTL wait
    assert time.monotonic() - t0 < 120
    assert "is gone" in rerun.extra["lease_taken_over"], rerun.extra
    # the killed run committed chunk 0 (maybe more): the rerun redoes at most what was in flight
    assert rerun.status == "ok" and rerun.plan["new"] == 0 and rerun.tracks_ok <= 1
    assert_same_store(store, world.clean_v2)


def test_settings_change_on_s3(ray_cluster, s3_server, tmp_path) -> None:
    """Catalog, audio and store on S3 (moto): no lookups for an empty store, then ETags from one
    listing of the audio prefix; a settings change re-embeds everything, an unchanged rerun does
    nothing."""

    bucket = "refresh-store"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    so = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    rows = []
    for tid, name, secs, hz in (("s1", "s1.flac", 1.3, 300.0), ("s2", "s2.wav", 2.1, 500.0)):
        path = write_tone(tmp_path / name, secs, hz)
        s3.upload_file(path, bucket, f"audio/{name}")
        rows.append((tid, f"s3://{bucket}/audio/{name}", tid.upper()))
    write_catalog(tmp_path / "cat.csv", rows)
    s3.upload_file(str(tmp_path / "cat.csv"), bucket, "catalog.csv")
    cat, root = f"s3://{bucket}/catalog.csv", f"s3://{bucket}/store"

    first = run_refresh(refresh_job(cat, root, storage_options=so, lookup_ray_min_rows=0))
    assert first.status == "ok" and first.plan["new"] == 2 and first.tracks_ok == 2, first.summary()
    assert first.extra["object_requests"] == 0  # nothing stored: nothing to look up
    t1 = {t["track_id"]: t for t in table(root, "tracks", so).to_pylist()}
    etag = s3.head_object(Bucket=bucket, Key="audio/s1.flac")["ETag"].strip('"')
    assert t1["s1"]["content_version"] == etag

    hop = run_refresh(refresh_job(cat, root, storage_options=so, lookup_ray_min_rows=0, hop_s=0.5))
    assert hop.plan["settings"] == 2 and hop.tracks_ok == 2 and hop.status == "ok", hop.summary()
    got = check_consistent(root, so)
    for tid, t in got["tracks"].items():
        assert t["run_id"] == hop.run_id and t["settings_id"] == hop.settings_id != t1[tid]["settings_id"]
        assert t["num_windows"] >= t1[tid]["num_windows"]  # hop 0.5 s: overlapping windows
    assert sum(t["num_windows"] for t in got["tracks"].values()) > sum(t["num_windows"] for t in t1.values())

    before = versions(root, so=so)
    same = run_refresh(refresh_job(cat, root, storage_options=so, hop_s=0.5))
    assert same.plan["unchanged"] == 2 and same.tracks_ok == 0 and versions(root, so=so) == before
    assert same.extra["object_requests"] == 1 and "lookups  1 object-store requests" in same.summary()
    assert StoreLock(Store(root, so), "probe").holder() is None  # released
