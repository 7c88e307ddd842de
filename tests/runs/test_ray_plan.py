"""The refresh plan made by Ray (``pipeline.runs.ray_plan``): the same decisions as the driver's
plan on a catalog with every kind of row, the same store after a real refresh (also after a
failure and a rerun), and the same object-store requests on a real S3 API (moto)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import lance
import numpy as np
import pytest

from pipeline.errors import InjectedFailure
from pipeline.faults import FAIL_ENV
from pipeline.runs.ray_plan import RAY_PLAN_MIN_SUBPREFIXES, use_ray_plan
from pipeline.runs.refresh import plan_on_driver, plan_with_ray, run_refresh
from pipeline.store.tables import Store
from tools.testkit.stores import (
    assert_same_store,
    check_consistent,
    embed_job,
    model_settings,
    refresh_job,
    synthetic_tracks,
    write_catalog,
    write_tone,
)


@dataclass
class Library:
    root: Path
    store_v1: Path
    cat_v2: str


def _jsonl(path: Path, rows: list[dict | str]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def library(ray_cluster, tmp_path_factory) -> Library:
    """A store of 9 tracks (embedded by the driver-planned engine), then a catalog with every kind
    of row against it: unchanged, content changed, moved, retitled, removed, new, unreadable,
    other settings, a duplicate id, refused and unparsable rows, a rejected row of a stored id."""
    root = tmp_path_factory.mktemp("rayplan")
    audio = root / "audio"
    audio.mkdir()
    spec = {"a": 1.0, "b": 1.3, "c": 1.1, "d": 1.2, "e": 1.0, "g": 1.4, "h": 1.0, "i": 1.1, "j": 1.2}
    files = {t: write_tone(audio / f"{t}.{('wav', 'flac', 'ogg')[k % 3]}", s, 200.0 + 40 * k)
             for k, (t, s) in enumerate(spec.items())}  # fmt: skip
    cat_v1 = write_catalog(root / "v1.csv", [(t, files[t], t.upper()) for t in spec])
    store = root / "store_v1"
    rep = run_refresh(refresh_job(cat_v1, str(store), planner="driver"))
    assert rep.status == "ok" and rep.tracks_ok == 9, rep.summary()
    lance.dataset(str(store / "tracks.lance")).update(
        {"settings_id": "'older-settings'"}, where="track_id = 'h'"
    )
    time.sleep(0.01)
    write_tone(audio / "b.flac", 1.3, 999.0)  # content changed
    moved = shutil.copy(files["d"], audio / "d-moved.ogg")
    Path(files["g"]).unlink()  # unreadable: lookup fails
    new = write_tone(audio / "f.wav", 0.9, 880.0)
    rows: list[dict | str] = [
        {"track_id": "a", "uri": files["a"], "title": "A"},
        {"track_id": "b", "uri": files["b"], "title": "B"},
        {"track_id": "c", "uri": files["c"], "title": "C (remastered)"},
        {"track_id": "d", "uri": str(moved), "title": "D"},
        {"track_id": "f", "uri": new, "title": "F"},
        {"track_id": "g", "uri": files["g"], "title": "G"},
        {"track_id": "h", "uri": files["h"], "title": "H"},
        {"track_id": "a", "uri": files["e"], "title": "second a"},  # duplicate id: the first wins
        {"track_id": "i", "uri": "/etc/passwd", "title": "I"},  # refused, but i stays (present)
        "{not json",
        {"track_id": "j", "uri": files["j"], "title": "J"},
    ]  # e is gone from the catalog: removed
    return Library(root, store, _jsonl(root / "v2.jsonl", rows))


def _copy(lib: Library, name: str) -> Path:
    dst = lib.root / name
    shutil.copytree(lib.store_v1, dst)
    return dst


def test_ray_plan_decides_like_the_driver(library: Library) -> None:
    store = Store(str(_copy(library, "parity")))
    job = refresh_job(library.cat_v2, store.root, chunk_size=2)
    drv = plan_on_driver(job, store, "run-x", True, {})
    ray = plan_with_ray(job, store, "run-y", True, {})
    assert drv.planner == "driver" and ray.planner == "ray"
    assert ray.counts == drv.counts == {
        "new": 1, "changed": 2, "settings": 1, "metadata": 1, "unchanged": 2, "removed": 1, "kept": 0,
        "lookup_failed": 1, "rejected": 3}  # fmt: skip
    assert {k: sorted(map(str, v)) for k, v in ray.samples.items()} == {
        k: sorted(map(str, v)) for k, v in drv.samples.items()
    }
    assert (ray.stored_tracks, ray.tracks_total, ray.meta_cols) == (
        drv.stored_tracks,
        drv.tracks_total,
        drv.meta_cols,
    )

    def keyed(rows: list[dict]) -> list[tuple]:
        return sorted(tuple(str(r[k]) for k in ("track_id", "stage", "error_type", "message")) for r in rows)

    assert keyed(ray.error_rows) == keyed(drv.error_rows)
    assert any("first used at row 0" in r["message"] for r in ray.error_rows)
    assert [ids for ids in ray.removed()] == [["e"]] and [
        r["track_id"] for b in ray.metadata() for r in b
    ] == ["c"]
    todo = ray.todo.ds.take_all()  # the rows to embed, cut into chunks of 2 on Ray's side
    assert ray.todo.count == len(todo) == 4
    want = {r["track_id"]: r for r in drv.todo}
    assert {r["track_id"] for r in todo} == set(want) == {"b", "d", "f", "h"}
    for r in todo:
        assert {k: r[k] for k in ("uri", "metadata_json", "content_version")} == {
            k: want[r["track_id"]][k] for k in ("uri", "metadata_json", "content_version")}  # fmt: skip
    assert sorted(r["chunk"] for r in todo) == [0, 0, 1, 1]
    kept = plan_with_ray(job, store, "run-z", False, {})
    assert kept.counts["removed"] == 0 and kept.counts["kept"] == 1


def test_ray_planned_refresh_equals_the_driver_planned_one(library: Library, monkeypatch) -> None:
    """A real refresh planned by Ray, first failing after its first chunk's commit, then run
    again: the same store as a driver-planned refresh; the rerun embeds only what was left."""
    want, got = _copy(library, "by-driver"), _copy(library, "by-ray")
    drv = run_refresh(refresh_job(library.cat_v2, str(want), chunk_size=2, planner="driver"))
    assert drv.status == "ok" and drv.tracks_ok == 4 and drv.deleted == 1, drv.summary()  # not g: unreadable
    monkeypatch.setenv(FAIL_ENV, "chunk_done:0")
    with pytest.raises(InjectedFailure):
        run_refresh(refresh_job(library.cat_v2, str(got), chunk_size=2, planner="ray"))
    monkeypatch.delenv(FAIL_ENV)
    rep = run_refresh(refresh_job(library.cat_v2, str(got), chunk_size=2, planner="ray"))
    assert rep.status == "ok" and rep.extra["planner"] == "ray", rep.summary()
    assert rep.plan["new"] + rep.plan["changed"] + rep.plan["settings"] < 4  # the first chunk stayed
    assert_same_store(got, want)
    assert check_consistent(got)["tracks"]["c"]["title"] == "C (remastered)"


def test_auto_planner_follows_the_catalog_size(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    write_tone(flat / "x.wav", 0.2, 300.0)
    deep = tmp_path / "deep"
    for k in range(RAY_PLAN_MIN_SUBPREFIXES):
        (deep / f"label-{k}").mkdir(parents=True)
    cat = write_catalog(tmp_path / "c.csv", [("x", str(flat / "x.wav"), "X")])
    store = str(tmp_path / "store")
    assert not use_ray_plan(refresh_job(cat, store))  # a small table
    assert not use_ray_plan(refresh_job(str(flat), store))  # a listing without sub-prefixes
    assert use_ray_plan(refresh_job(str(deep), store))  # a listing to split by sub-prefix
    assert not use_ray_plan(refresh_job(str(deep), store, limit=5))  # --limit: catalog order, driver
    assert use_ray_plan(refresh_job(cat, store, planner="ray"))
    assert not use_ray_plan(refresh_job(str(deep), store, planner="driver"))
    with pytest.raises(ValueError, match="--planner"):
        refresh_job(cat, store, planner="cluster")


def test_listing_lookups_cost_the_same_requests_on_s3(ray_cluster, s3_server, tmp_path: Path) -> None:
    """Without a version column, both planners list each prefix once and HEAD the lone object:
    same plan, same request count, against a real S3 API."""
    s3 = s3_server.client()
    s3_server.bucket("ray-plan")
    bucket = "ray-plan"
    keys = [f"label-{p}/t{i:03d}.flac" for p in "ab" for i in range(40)] + ["singles/lone.flac"]
    etags = {f"s3://{bucket}/{k}": s3.put_object(Bucket=bucket, Key=k, Body=k.encode())["ETag"].strip('"')
             for k in keys}  # fmt: skip
    uris = sorted(etags)
    ids = [f"t{i}" for i in range(len(uris))]
    cat = tmp_path / "plain.csv"
    cat.write_text("track_id,uri\n" + "".join(f"{t},{u}\n" for t, u in zip(ids, uris, strict=True)))
    so = s3_server.options()
    store = str(tmp_path / "store")
    stored = [etags[u] for u in uris]
    stored[0] = "an-older-etag"  # its object changed since it was embedded
    job = refresh_job(str(cat), store, storage_options=so, allowed_prefixes=(f"s3://{bucket}/",))
    synthetic_tracks(store, ids, uris, stored, model_settings(embed_job(str(cat), store)))
    writer = Store(store)
    drv = plan_on_driver(job, writer, "r1", True, {})
    ray = plan_with_ray(job, writer, "r2", True, {})
    assert (
        ray.counts == drv.counts and ray.counts["changed"] == 1 and ray.counts["unchanged"] == len(uris) - 1
    )
    assert ray.requests == drv.requests == 3  # 2 LISTs + 1 HEAD
    assert [r["track_id"] for r in ray.todo.ds.take_all()] == ["t0"]
    dry = run_refresh(replace(replace(job, planner="ray"), dry_run=True))
    assert dry.extra["object_requests"] == 3 and dry.plan["changed"] == 1


def test_a_broken_catalog_is_one_line_under_ray(ray_cluster, tmp_path: Path) -> None:
    from pipeline.errors import CatalogError

    bad = tmp_path / "bad.csv"
    bad.write_text("track_id,path\nx,/a.wav\n")
    with pytest.raises(
        CatalogError, match=r"^.*bad.csv: catalog has no 'uri' column \(columns: track_id, path\)$"
    ):
        run_refresh(replace(refresh_job(str(bad), str(tmp_path / "s"), planner="ray"), dry_run=True))


def test_embed_of_a_listing_split_by_sub_prefix(ray_cluster, tmp_path: Path) -> None:
    """The embed job over a directory whose sub-directories are read side by side (Ray planner)
    makes the same store as the driver's single listing."""
    from pipeline.runs.embed import run_embed

    lib = tmp_path / "lib"
    for k, sub in enumerate(("label-a", "label-b/2019", "label-c")):
        (lib / sub).mkdir(parents=True)
        for j in range(2):
            write_tone(lib / sub / f"t{j}.{('wav', 'flac')[j]}", 0.8 + 0.1 * j, 250.0 + 60 * k + 20 * j)
    write_tone(lib / "top.ogg", 0.9, 700.0)
    reports = {}
    for planner in ("ray", "driver"):
        job = embed_job(str(lib), str(tmp_path / planner))
        reports[planner] = run_embed(job, progress=False, chunk_size=3, planner=planner)
    assert reports["ray"].extra["planner"] == "ray" and reports["driver"].extra["planner"] == "driver"
    assert reports["ray"].tracks_ok == reports["driver"].tracks_ok == 7
    a, b = check_consistent(tmp_path / "ray"), check_consistent(tmp_path / "driver")
    assert sorted(a["tracks"]) == sorted(b["tracks"]) and len(a["windows"]) == len(b["windows"])
    for tid, ta in a["tracks"].items():
        assert ta["uri"] == b["tracks"][tid]["uri"] and ta["num_windows"] == b["tracks"][tid]["num_windows"]
        np.testing.assert_allclose(ta["layer_3"], b["tracks"][tid]["layer_3"], atol=1e-5)


def test_orphans_found_by_ray_as_on_the_driver(ray_cluster, tmp_path: Path) -> None:
    """The sweep's distributed anti-join finds the same orphan rows and missing tracks."""
    from pipeline.runs.ray_plan import find_orphans_ray
    from pipeline.store.maintenance import find_orphans, sweep
    from tools.testkit.stores import orphan_store

    store = Store(str(orphan_store(tmp_path / "s")))
    by_ray, by_driver = find_orphans_ray(store), find_orphans(store)
    assert by_ray.by_run == by_driver.by_run == {"r0": {"t03", "t07"}, "r9": {"gone"}}
    assert (by_ray.missing, by_ray.n_missing) == (by_driver.missing, by_driver.n_missing) == (["t09"], 1)
    assert sweep(store, found=by_ray) == ({"frames": 4, "windows": 4}, ["t09"], 1)
    assert find_orphans_ray(store).by_run == {}
