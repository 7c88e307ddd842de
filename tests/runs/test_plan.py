"""Change detection without a request per object (``pipeline.runs.plan.lookup_versions``), on a
real S3 API (moto) behind ``tools/fault_proxy.py``, whose counters give the requests each path
really made: zero with a version column in the catalog, a LIST per prefix without one, a HEAD
only for objects no listing covers, and nothing for tracks the store does not hold yet."""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.io.objects import content_version, object_versions
from pipeline.runs.plan import catalog_rows, lookup_versions, make_plan
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


def _rows(catalog: str, so: dict, tmp_path: Path) -> list[dict]:
    job = embed_job(
        catalog, str(tmp_path / "store"), storage_options=so, allowed_prefixes=(f"s3://{BUCKET}/",)
    )
    rows, rejected, _meta = catalog_rows(job)
    assert rejected == []
    return rows


def _requests(proxy: FaultProxy) -> dict[str, int]:
    s = proxy.snapshot()
    return {c: s.get(f"{c}.requests", 0) for c in ("get", "list", "put")}


def test_version_column_asks_no_object(s3_server, library: dict, tmp_path: Path) -> None:
    """A catalog with an ``etag`` column (or ``content_version``, or ``size`` + ``mtime``) is
    trusted: the lookup makes no request at all, and the versions are the catalog's."""
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
            rows = _rows(_catalog(s3_server, name, uris, extra), so, tmp_path)
            before = _requests(proxy)
            got = lookup_versions(rows, so, stored_ids={r["track_id"] for r in rows})
            assert _requests(proxy) == before, name  # not one request to object storage
            assert got.requests == 0 and got.from_catalog == len(rows)
            assert got.by_id == {} and [got.of(r) for r in rows] == want, name
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
        rows = _rows(_catalog(s3_server, "plain.csv", [*uris, missing]), so, tmp_path)
        assert all("content_version" not in r for r in rows)
        before = _requests(proxy)
        got = lookup_versions(rows, so, stored_ids={r["track_id"] for r in rows})
        after = _requests(proxy)
    made = {k: after[k] - before[k] for k in after}
    assert made == {"get": 1, "list": len(PREFIXES), "put": 0}
    assert got.requests == made["get"] + made["list"] <= len(rows) // 500 + 1
    assert got.listed_prefixes == len(PREFIXES) and got.heads == 1
    by_uri = {r["uri"]: got.by_id[r["track_id"]] for r in rows}
    listed = [u for u in uris if any(f"/{p}/" in u for p in PREFIXES)]
    assert len(listed) == 1500 and all(isinstance(by_uri[u], str) for u in listed)  # no dict a row
    assert {r["uri"]: got.of(r) for r in rows if r["uri"] != missing} == {
        u: t.strip('"') for u, t in library["etags"].items()
    }
    assert by_uri[missing]["content_version"] is None and by_uri[missing]["error_type"] == "FetchError"
    assert "not found" in by_uri[missing]["message"]


def test_only_stored_tracks_are_looked_up(s3_server, library: dict, tmp_path: Path) -> None:
    """Rows whose track is not in the store need no version: with 3 of 1,501 stored (each alone
    in the lookup of its prefix), 3 HEADs; with none stored, no request."""
    uris = sorted(library["etags"])
    with FaultProxy(s3_server) as proxy:
        so = s3_server.options(endpoint=proxy.url)
        rows = _rows(_catalog(s3_server, "plain2.csv", uris), so, tmp_path)
        before = _requests(proxy)
        none = lookup_versions(rows, so, stored_ids=set())
        assert _requests(proxy) == before and none.requests == 0 and none.by_id == {}
        stored = {rows[0]["track_id"], rows[PER_PREFIX]["track_id"], rows[-1]["track_id"]}
        some = lookup_versions(rows, so, stored_ids=stored)
        after = _requests(proxy)
    assert {k: after[k] - before[k] for k in after} == {"get": 3, "list": 0, "put": 0}
    assert some.requests == 3 and set(some.by_id) == stored
    # the plan: the unstored rows are new (no version yet: the fetch records it), the stored unchanged
    stored_tbl = pa.Table.from_pylist(
        [{"track_id": r["track_id"], "uri": r["uri"], "content_version": some.of(r),
          "settings_id": "S"} for r in rows if r["track_id"] in stored]
    )  # fmt: skip
    plan = make_plan(rows, stored_tbl, some.by_id, "S", [], delete_missing=True)
    assert len(plan.new) == len(rows) - 3 and sorted(plan.unchanged) == sorted(stored)
    assert all(r["content_version"] is None for r in plan.new) and not plan.lookup_failed


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
    assert [(m["row"]["track_id"], m["stored"]["title"]) for m in plan.metadata] == [("t66000", "T66000")]
    assert [(r["track_id"], r["content_version"]) for r in plan.new] == [("fresh", "c1")]
    assert [(f["track_id"], f["message"]) for f in plan.lookup_failed] == [
        ("t8", "not found: /m/8"),
        ("t7", "no content version"),
    ]
    assert plan.removed == ["gone"] and plan.kept == []
    assert len(plan.unchanged) == n - 6 and plan.unchanged[:3] == ["t0", "t1", "t2"]


def test_heads_through_a_ray_map_are_counted(ray_cluster, s3_server, library: dict, tmp_path: Path) -> None:
    """Objects no listing covers (here: prefixes never listed, ``min_per_prefix`` too high) get
    one HEAD each, in a Ray map for many of them; the count is what the proxy saw."""
    uris = sorted(library["etags"])[:: PER_PREFIX // 10][:30]
    with FaultProxy(s3_server) as proxy:
        so = s3_server.options(endpoint=proxy.url)
        rows = _rows(_catalog(s3_server, "sparse.csv", uris), so, tmp_path)
        before = _requests(proxy)
        got = lookup_versions(rows, so, threads=4, ray_min_rows=0, stored_ids=None, min_per_prefix=10**9)
        after = _requests(proxy)
    assert {k: after[k] - before[k] for k in after} == {"get": len(rows), "list": 0, "put": 0}
    assert got.requests == got.heads == len(rows) and got.listed_prefixes == 0
    assert [got.of(r) for r in rows] == [library["etags"][u].strip('"') for u in uris]
