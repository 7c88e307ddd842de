"""Change detection without a request per object (the driver's plan, ``pipeline.runs.plan.driver_plan``,
and its one version lookup, ``pipeline.runs.decide.LookupGroup``), on a real S3 API (moto) behind
``tools/fault_proxy.py``, whose counters give the requests each path really made: zero with a
version column in the catalog, a LIST per prefix without one, a HEAD only for objects no listing
covers, and nothing for tracks the store does not hold yet."""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.io.objects import content_version, object_versions
from pipeline.runs.decide import stored_projection
from pipeline.runs.plan import Plan, catalog_rows, catalog_table, driver_plan, make_plan
from tools.fault_proxy import FaultProxy
from tools.testkit.stores import embed_job

BUCKET = "plan-versions"
PREFIXES = ("label-a/2019", "label-b/2021", "label-c/live")
PER_PREFIX = 500  # 1,500 objects under 3 prefixes


@pytest.fixture(scope="module")
def library(s3_server) -> dict:
    """1,500 tiny objects under 3 prefixes, a lone object in a fourth, and their ETags."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    keys = [f"{p}/t{i:04d}.flac" for p in PREFIXES for i in range(PER_PREFIX)] + ["singles/lone.flac"]

    def put(key: str) -> tuple[str, str]:
        return f"s3://{BUCKET}/{key}", s3.put_object(Bucket=BUCKET, Key=key, Body=key.encode())["ETag"]

    with cf.ThreadPoolExecutor(8) as pool:
        etags = dict(pool.map(put, keys))
    return {"etags": etags, "so": s3_server.options()}


def _catalog(s3_server, name: str, uris: list[str], extra: dict[str, list[str]] | None = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["track_id", "uri", *(extra or {})]
    w.writerow(cols)
    for i, u in enumerate(uris):
        w.writerow([f"t{i}", u, *(v[i] for v in (extra or {}).values())])
    s3_server.client().put_object(Bucket=BUCKET, Key=f"catalogs/{name}", Body=buf.getvalue().encode())
    return f"s3://{BUCKET}/catalogs/{name}"


def _catalog_table(catalog: str, so: dict, tmp_path: Path) -> pa.Table:
    job = embed_job(
        catalog, str(tmp_path / "store"), storage_options=so, allowed_prefixes=(f"s3://{BUCKET}/",)
    )
    table, _meta = catalog_table(job)
    assert table["error_type"].null_count == table.num_rows  # nothing rejected
    return table


def _stored(catalog: pa.Table, versions: dict[str, str | None]) -> pa.Table:
    """The stored projection of the catalog rows whose ids are in ``versions``, with these versions."""
    rows = [r for r in catalog.to_pylist() if r["track_id"] in versions]
    return stored_projection(
        pa.Table.from_pylist(
            [{"track_id": r["track_id"], "uri": r["uri"], "content_version": versions[r["track_id"]],
              "settings_id": "S"} for r in rows],
            schema=pa.schema([(c, pa.string()) for c in ("track_id", "uri", "content_version", "settings_id")]),
        ),
        [],
    )  # fmt: skip


def _plan(catalog: pa.Table, stored: pa.Table | None, so: dict, **kw) -> Plan:
    return driver_plan(catalog, stored, "S", [], True, so, **kw)


def _requests(proxy: FaultProxy) -> dict[str, int]:
    s = proxy.snapshot()
    return {c: s.get(f"{c}.requests", 0) for c in ("get", "list", "put")}


def test_version_column_asks_no_object(s3_server, library: dict, tmp_path: Path) -> None:
    """A catalog with an ``etag`` column (or ``content_version``, or ``size`` + ``mtime``) is
    trusted: the plan makes no request at all, and the versions compared are the catalog's."""
    uris = sorted(library["etags"])
    tags = [library["etags"][u] for u in uris]
    cases = {
        "etag.csv": ({"etag": tags}, [t.strip('"') for t in tags]),
        "cv.csv": (
            {"content_version": [f"rev{i}" for i in range(len(uris))]},
            [f"rev{i}" for i in range(len(uris))],
        ),
        "sm.csv": (
            {"size": [str(100 + i) for i in range(len(uris))], "mtime": ["2026-01-01T00:00:00Z"] * len(uris)},
            [f"{100 + i}-2026-01-01T00:00:00Z" for i in range(len(uris))],
        ),
    }
    with FaultProxy(s3_server) as proxy:
        so = s3_server.options(endpoint=proxy.url)
        for name, (extra, want) in cases.items():
            cat = _catalog_table(_catalog(s3_server, name, uris, extra), so, tmp_path)
            assert cat["content_version"].to_pylist() == want, name
            stored = dict(zip(cat["track_id"].to_pylist(), want, strict=True))
            stored["t0"] = "an-older-version"
            before = _requests(proxy)
            plan = _plan(cat, _stored(cat, stored), so)
            assert _requests(proxy) == before, name  # not one request to object storage
            assert plan.requests == 0 and len(plan.unchanged) == len(uris) - 1, name
            assert [(r["track_id"], r["content_version"]) for r in plan.changed] == [("t0", want[0])], name
    # the ETag column gives what a HEAD gives: switching from HEADs to the column re-embeds nothing
    assert want_head(uris[0], s3_server.options()) == tags[0].strip('"')


def want_head(uri: str, so: dict) -> str:
    return content_version(uri, storage_options=so)


def test_listing_joins_prefixes_heads_only_the_rest(s3_server, library: dict, tmp_path: Path) -> None:
    """Without a version column: one LIST per prefix (<= 1,000 keys a page) covers 1,500 objects
    (requests <= rows / 500); the lone object gets a HEAD; a missing object under a listed prefix
    is a lookup error without a request of its own; the reported count is the proxy's."""
    uris = sorted(library["etags"])
    missing = f"s3://{BUCKET}/{PREFIXES[0]}/gone.flac"
    with FaultProxy(s3_server) as proxy:
        so = s3_server.options(endpoint=proxy.url)
        cat = _catalog_table(_catalog(s3_server, "plain.csv", [*uris, missing]), so, tmp_path)
        assert cat["content_version"].null_count == cat.num_rows
        by_id = dict(zip(cat["track_id"].to_pylist(), cat["uri"].to_pylist(), strict=True))
        stored = {t: library["etags"].get(u, '"old"').strip('"') for t, u in by_id.items()}
        stored["t0"] = "an-older-etag"
        before = _requests(proxy)
        plan = _plan(cat, _stored(cat, stored), so)
        after = _requests(proxy)
    made = {k: after[k] - before[k] for k in after}
    assert made == {"get": 1, "list": len(PREFIXES), "put": 0}
    assert plan.requests == made["get"] + made["list"] <= cat.num_rows // 500 + 1
    assert [(r["track_id"], r["content_version"]) for r in plan.changed] == [
        ("t0", library["etags"][by_id["t0"]].strip('"'))
    ]
    assert len(plan.unchanged) == len(uris) - 1 and not plan.new
    [failed] = plan.lookup_failed
    assert (failed["uri"], failed["stage"], failed["error_type"]) == (missing, "lookup", "FetchError")
    assert "not found" in failed["message"]


def test_only_stored_tracks_are_looked_up(s3_server, library: dict, tmp_path: Path) -> None:
    """Rows whose track is not in the store need no version: with 3 of 1,501 stored (each alone
    in the lookup of its prefix), 3 HEADs; with none stored, no request."""
    uris = sorted(library["etags"])
    with FaultProxy(s3_server) as proxy:
        so = s3_server.options(endpoint=proxy.url)
        cat = _catalog_table(_catalog(s3_server, "plain2.csv", uris), so, tmp_path)
        before = _requests(proxy)
        none = _plan(cat, None, so)
        assert _requests(proxy) == before and none.requests == 0 and len(none.new) == len(uris)
        ids = cat["track_id"].to_pylist()
        stored = {ids[i]: library["etags"][uris[i]].strip('"') for i in (0, PER_PREFIX, len(uris) - 1)}
        some = _plan(cat, _stored(cat, stored), so)
        after = _requests(proxy)
    assert {k: after[k] - before[k] for k in after} == {"get": 3, "list": 0, "put": 0}
    assert some.requests == 3
    # the unstored rows are new (no version yet: the fetch records it), the stored unchanged
    assert len(some.new) == len(uris) - 3 and sorted(some.unchanged) == sorted(stored)
    assert all(r["content_version"] is None for r in some.new) and not some.lookup_failed


def test_object_versions_local_and_threshold(tmp_path: Path) -> None:
    """Local files: a directory holding >= ``min_per_prefix`` wanted files is read once, the
    others are stat-ed one by one; versions equal :func:`content_version`'s either way."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [tmp_path / "a" / f"{i}.wav" for i in range(5)] + [tmp_path / "b" / "x.wav"]
    for i, f in enumerate(files):
        f.write_bytes(b"x" * (i + 1))
    uris = [str(f) for f in files]
    got = object_versions(uris + [str(tmp_path / "a" / "nope.wav")], min_per_prefix=2, threads=1)
    assert (got.prefixes, got.lists, got.heads) == (1, 1, 1)
    assert got.versions == {u: content_version(u) for u in uris}
    assert list(got.errors) == [str(tmp_path / "a" / "nope.wav")]
    every = object_versions(uris, min_per_prefix=10, threads=2)
    assert (every.lists, every.heads) == (0, len(uris)) and every.versions == got.versions


def test_catalog_version_reaches_the_row(tmp_path: Path) -> None:
    """``catalog_rows`` carries the catalog's version into each row (where stated), so the plan
    and the stored ``content_version`` are the catalog's."""
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"")
    cat = tmp_path / "c.jsonl"
    cat.write_text(
        json.dumps({"uri": "a.wav", "etag": 'W/"abc"'})
        + "\n"
        + json.dumps({"uri": "b.wav", "etag": ""})
        + "\n"
    )
    rows, _, meta = catalog_rows(embed_job(str(cat), str(tmp_path / "s")))
    assert [r["content_version"] for r in rows] == ["abc", None]
    assert meta == ["etag"]  # the column stays metadata too


def test_plan_with_catalog_versions_and_arrow_join() -> None:
    """make_plan on catalog-stated versions (no lookups): equal -> unchanged, different ->
    changed, metadata compared column by column, stored ids absent from the catalog removed
    (rejected ids kept as present), new rows keep the catalog's version; same kinds as the
    row-by-row rules, over more rows than one metadata slice."""
    n = 70_000
    stored = pa.table(
        {
            "track_id": [f"t{i}" for i in range(n)] + ["gone", "rejected"],
            "uri": [f"/m/{i}" for i in range(n)] + ["/m/gone", "/m/rej"],
            "content_version": [f"v{i}" for i in range(n)] + ["v", "v"],
            "settings_id": ["S"] * (n - 1) + ["OLD", "S", "S"],
            "title": [f"T{i}" for i in range(n)] + ["G", "R"],
        }
    )
    rows = [
        {
            "track_id": f"t{i}",
            "uri": f"/m/{i}",
            "metadata_json": json.dumps({"title": f"T{i}"}),
            "content_version": f"v{i}",
        }
        for i in range(n)
    ]
    rows[5]["content_version"] = "v5-new"  # content changed
    rows[6]["uri"] = "/moved/6"  # moved
    rows[66_000]["metadata_json"] = json.dumps({"title": "retitled"})  # metadata only, second slice
    rows.append({"track_id": "fresh", "uri": "/m/fresh", "metadata_json": "{}", "content_version": "c1"})
    rows.append({"track_id": "t7", "uri": "/m/7", "metadata_json": "{}", "content_version": None})
    del rows[7]  # t7 now has no version stated and none looked up
    versions = {"t8": {"content_version": None, "error_type": "FetchError", "message": "not found: /m/8"}}
    plan = make_plan(rows, stored, versions, "S", ["title"], delete_missing=True, present_ids=["rejected"])
    assert plan.stored_tracks == n + 2
    assert [r["track_id"] for r in plan.changed] == ["t5", "t6"]
    assert [r["content_version"] for r in plan.changed] == ["v5-new", "v6"]
    assert [r["track_id"] for r in plan.settings] == [f"t{n - 1}"]
    assert [(m["track_id"], m["metadata_json"]) for m in plan.metadata] == [
        ("t66000", '{"title": "retitled"}')
    ]
    assert [(r["track_id"], r["content_version"]) for r in plan.new] == [("fresh", "c1")]
    assert [(f["track_id"], f["message"]) for f in plan.lookup_failed] == [
        ("t8", "not found: /m/8"),
        ("t7", "no content version"),
    ]
    assert (
        plan.removed == ["gone"]
        and plan.kept == []
        and [r["track_id"] for r in plan.rejected] == ["rejected"]
    )
    assert len(plan.unchanged) == n - 6 and plan.unchanged[:3] == ["t0", "t1", "t2"]


def test_heads_through_a_ray_map_are_counted(ray_cluster, s3_server, library: dict, tmp_path: Path) -> None:
    """Objects no listing covers (here: prefixes never listed, ``min_per_prefix`` too high) get
    one HEAD each, through the Ray planner's lookup stage (grouped by parent prefix) when many
    are left; the count is what the proxy saw."""
    uris = sorted(library["etags"])[:: PER_PREFIX // 10][:30]
    with FaultProxy(s3_server) as proxy:
        so = s3_server.options(endpoint=proxy.url)
        cat = _catalog_table(_catalog(s3_server, "sparse.csv", uris), so, tmp_path)
        ids = cat["track_id"].to_pylist()
        stored = {t: library["etags"][u].strip('"') for t, u in zip(ids, uris, strict=True)}
        stored["t1"] = "an-older-etag"
        before = _requests(proxy)
        plan = _plan(cat, _stored(cat, stored), so, threads=4, ray_min_rows=0, min_per_prefix=10**9)
        after = _requests(proxy)
    assert {k: after[k] - before[k] for k in after} == {"get": len(uris), "list": 0, "put": 0}
    assert plan.requests == len(uris)
    assert [r["track_id"] for r in plan.changed] == ["t1"] and len(plan.unchanged) == len(uris) - 1
    assert plan.changed[0]["content_version"] == library["etags"][uris[1]].strip('"')


def _catalog_part(rows: list[tuple]) -> pa.Table:
    """CATALOG_ROWS_SCHEMA rows from (row_key, row, track_id, uri, title, version, error_type)."""
    from pipeline import schemas

    return pa.Table.from_pylist(
        [{"row_key": k, "row": r, "track_id": t, "uri": u, "metadata_json": None if e else json.dumps({"title": m}),
          "content_version": v, "error_type": e, "message": "refused" if e else None}
         for k, r, t, u, m, v, e in rows],
        schema=schemas.CATALOG_ROWS_SCHEMA,
    )  # fmt: skip


def test_decide_is_the_same_whole_or_per_hash_partition() -> None:
    """``decide`` on a catalog with every kind of row gives the same rows whole (the driver) and
    split by hash partition of track_id (the Ray planner); a duplicate id in another catalog
    part with the same row number is still the later row (catalog order is ``row_key``)."""
    from pipeline.runs.decide import decide
    from pipeline.runs.ray_plan import partition_of

    part1 = 1 << 40  # row_key of the second catalog part's row 0
    cat = _catalog_part([
        (0, 0, "same", "/m/same", "T", "v1", None), (1, 1, "content", "/m/content", "T", "v2", None),
        (2, 2, "moved", "/n/moved", "T", "v1", None), (3, 3, "settings", "/m/settings", "T", "v1", None),
        (4, 4, "meta", "/m/meta", "U", "v1", None), (5, 5, "pending", "/m/pending", "T", None, None),
        (6, 6, "new", "/m/new", "T", None, None), (7, 7, "kept-id", "/etc/passwd", None, None, "UriRefused"),
        (8, 8, None, None, None, None, "CatalogError"), (part1, 0, "same", "/m/other", "T", "v1", None),
        (part1 + 2, 2, "dup2", "/m/dup2", "T", "v1", None), (part1 + 3, 3, "dup2", "/m/dup2b", "T", "v1", None),
    ])  # fmt: skip
    stored = stored_projection(pa.Table.from_pylist(
        [{"track_id": t, "uri": f"/m/{t}", "content_version": "v1", "settings_id": "OLD" if t == "settings" else "S",
          "title": "T"} for t in ("same", "content", "moved", "settings", "meta", "pending", "kept-id", "gone", "dup2")]
    ), ["title"])  # fmt: skip
    whole = decide(cat, stored, None, "S", ["title"], delete_missing=True)
    kinds = {(r["track_id"], r["row_key"]): r["kind"] for r in whole.to_pylist()}
    assert kinds == {
        ("same", 0): "unchanged", ("content", 1): "changed", ("moved", 2): "changed", ("settings", 3): "settings",
        ("meta", 4): "metadata", ("pending", 5): "pending", ("new", 6): "new", ("kept-id", 7): "rejected",
        (None, 8): "rejected", ("same", part1): "rejected", ("dup2", part1 + 2): "unchanged",
        ("dup2", part1 + 3): "rejected", ("gone", None): "removed",
    }  # fmt: skip
    dup = whole.filter(pa.compute.equal(whole["row_key"], part1)).to_pylist()[0]
    assert (dup["error_type"], dup["stage"]) == ("DuplicateTrackId", "catalog")
    assert dup["message"] == "duplicate track_id 'same': first used at row 0, which wins"
    pending = whole.filter(pa.compute.equal(whole["kind"], "pending"))
    assert pending["s_content_version"].to_pylist() == ["v1"]  # kept for the lookup stage

    parts = 3
    cat_part = partition_of(cat["track_id"], cat["row_key"], parts)
    stored_part = partition_of(stored["track_id"], pa.array([0] * stored.num_rows), parts)
    split = [decide(cat.filter(pa.array(cat_part == p)), stored.filter(pa.array(stored_part == p)), None, "S",
                    ["title"], delete_missing=True) for p in range(parts)]  # fmt: skip
    key = [("row_key", "ascending"), ("track_id", "ascending")]
    assert pa.concat_tables(split).sort_by(key).equals(whole.sort_by(key))
