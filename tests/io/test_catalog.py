"""Catalog reading, URI policy, ids, content versions and fetching; local files and a real S3 API."""

from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import (
    CatalogError,
    DuplicateTrackId,
    FetchError,
    PipelineError,
    UriRefused,
    error_type,
    redact,
)
from pipeline.io.catalog import CatalogEntry, RejectedRow, iter_catalog, read_catalog
from pipeline.io.objects import content_version, fetch_bytes, open_uri
from pipeline.io.uris import UriPolicy, normalize_uri, resolve_uri, stable_track_id
from tools.testkit.memory import traced_peak

ID_RE = re.compile(r"^t_[0-9a-f]{16}$")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def music_root(tmp_path: Path) -> Path:
    """tmp/music/{a.wav, sub/b.flac, sub/deeper/c.OGG, .hidden.wav, notes.txt} (contents irrelevant)."""
    root = tmp_path / "music"
    (root / "sub" / "deeper").mkdir(parents=True)
    for rel in ("a.wav", "sub/b.flac", "sub/deeper/c.OGG", ".hidden.wav", "notes.txt", "sub/d.opus"):
        (root / rel).write_bytes(b"RIFF")
    return root


# ---------------------------------------------------------------------------------------------
# the shared catalog (CSV)
# ---------------------------------------------------------------------------------------------


def test_shared_catalog_csv(audio_dir: Path) -> None:
    entries, rejected = read_catalog(str(audio_dir / "catalog.csv"))
    assert rejected == []
    assert len(entries) == 12
    first = entries[0]
    assert first.track_id == "hw_city"
    assert first.uri == str(audio_dir / "clips" / "hw_city.ogg")
    assert os.path.isabs(first.uri) and Path(first.uri).is_file()
    # duration_s is reserved (the pipeline writes its own) -> renamed
    assert first.metadata == {
        "title": "City",
        "artist": "HSR",
        "package": "hedgewars-data",
        "license": "GPL-2",
        "catalog_duration_s": "30.000",
        "format": "ogg_vorbis",
        "sample_rate": "44100",
        "channels": "2",
    }
    assert all(Path(e.uri).is_file() for e in entries)
    # the directory form of the same folder lists the 12 clips and 4 variants
    listed, rej = read_catalog(str(audio_dir))
    assert rej == [] and len(listed) == 16
    assert {e.uri for e in entries} <= {e.uri for e in listed}
    assert all(ID_RE.match(e.track_id) and e.metadata == {} for e in listed)


# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------


def _rows_as_dicts() -> list[dict]:
    return [
        {
            "track_id": "007",
            "uri": "a.wav",
            "title": "Bond",
            "year": 1962,
            "duration_s": 1.5,
            "tags": ["x", "y"],
        },
        {"track_id": None, "uri": "sub/b.flac", "title": None, "year": 1999, "duration_s": None, "tags": []},
        {
            "track_id": "c",
            "uri": "sub/deeper/c.OGG",
            "title": 'Névé "quoted", comma',
            "year": None,
            "duration_s": 2.0,
            "tags": None,
        },
    ]


def _check_three(entries: list[CatalogEntry], root: Path) -> None:
    assert [e.uri for e in entries] == [
        str(root / "a.wav"),
        str(root / "sub/b.flac"),
        str(root / "sub/deeper/c.OGG"),
    ]
    assert entries[0].track_id == "007"  # leading zeros kept: values are read as strings
    assert entries[1].track_id == stable_track_id(str(root / "sub/b.flac"))
    assert entries[2].track_id == "c"
    assert entries[0].metadata["title"] == "Bond"
    assert entries[0].metadata["year"] == "1962"
    assert entries[1].metadata["title"] is None
    assert entries[2].metadata["title"] == 'Névé "quoted", comma'
    assert "duration_s" not in entries[0].metadata and "catalog_duration_s" in entries[0].metadata
    assert entries[2].metadata["year"] is None


def test_csv_catalog(music_root: Path) -> None:
    rows = _rows_as_dicts()
    cat = _write_csv(
        music_root / "catalog.csv",
        ["track_id", "uri", "title", "year", "duration_s"],
        [
            [r["track_id"] or "", r["uri"], r["title"] or "", "" if r["year"] is None else str(r["year"]), ""]
            for r in rows
        ],
    )
    entries, rejected = read_catalog(str(cat))
    assert rejected == []
    _check_three(entries, music_root)


def test_csv_bom_and_quoted_newline(music_root: Path) -> None:
    (music_root / "bom.csv").write_bytes('\ufeffuri,title\na.wav,"two\nlines"\n'.encode())
    (e,), rejected = read_catalog(str(music_root / "bom.csv"))
    assert rejected == [] and e.metadata == {"title": "two\nlines"}


def test_tsv_and_gzip(music_root: Path) -> None:
    import gzip

    (music_root / "cat.tsv").write_text("uri\ttitle\na.wav\tA, with comma\n")
    entries, _ = read_catalog(str(music_root / "cat.tsv"))
    assert entries[0].metadata == {"title": "A, with comma"}
    with gzip.open(music_root / "cat.csv.gz", "wt") as f:
        f.write("uri,title\na.wav,A\nsub/b.flac,B\n")
    entries, _ = read_catalog(str(music_root / "cat.csv.gz"))
    assert [e.metadata["title"] for e in entries] == ["A", "B"]


def test_parquet_catalog(music_root: Path) -> None:
    table = pa.Table.from_pylist(_rows_as_dicts())
    assert table.schema.field("year").type == pa.int64()
    pq.write_table(table, music_root / "catalog.parquet", row_group_size=2)
    entries, rejected = read_catalog(str(music_root / "catalog.parquet"))
    assert rejected == []
    _check_three(entries, music_root)
    assert entries[0].metadata["catalog_duration_s"] == "1.5"
    assert json.loads(entries[0].metadata["tags"]) == ["x", "y"]


def test_jsonl_catalog(music_root: Path) -> None:
    lines = [json.dumps(r) for r in _rows_as_dicts()]
    lines.insert(1, "")  # blank lines are skipped
    lines.insert(2, "{not json")
    lines.insert(3, "[1, 2]")
    (music_root / "catalog.jsonl").write_text("\n".join(lines) + "\n")
    entries, rejected = read_catalog(str(music_root / "catalog.jsonl"))
    _check_three(entries, music_root)
    assert [(r.row, r.error_type) for r in rejected] == [(1, "CatalogError"), (2, "CatalogError")]
    assert "invalid JSON on line 3" in rejected[0].message
    assert "line 4 is not a JSON object" in rejected[1].message
    assert json.loads(entries[0].metadata["tags"]) == ["x", "y"]
    # a .json file holding an array is accepted too
    (music_root / "catalog.json").write_text(json.dumps(_rows_as_dicts()))
    entries2, _ = read_catalog(str(music_root / "catalog.json"))
    assert [e.uri for e in entries2] == [e.uri for e in entries]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_missing_uri_column(tmp_path: Path, fmt: str) -> None:
    rows = [{"track_id": "a", "path": "a.wav"}]
    p = tmp_path / f"cat.{fmt}"
    if fmt == "csv":
        _write_csv(p, ["track_id", "path"], [["a", "a.wav"]])
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), p)
    else:
        p.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(CatalogError, match="no 'uri'") as ei:
        read_catalog(str(p))
    assert ei.value.stage == "catalog"


def test_catalog_level_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="catalog not found"):
        read_catalog(str(tmp_path / "missing.csv"))
    (tmp_path / "cat.xlsx").write_bytes(b"PK")
    with pytest.raises(CatalogError, match="unknown catalog format"):
        read_catalog(str(tmp_path / "cat.xlsx"))
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(CatalogError, match="empty"):
        read_catalog(str(tmp_path / "empty.csv"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CatalogError, match="Parquet"):
        read_catalog(str(tmp_path / "bad.parquet"))
    _write_csv(tmp_path / "dup.csv", ["uri", "title", "title"], [["a.wav", "x", "y"]])
    with pytest.raises(CatalogError, match="duplicate column"):
        read_catalog(str(tmp_path / "dup.csv"))
    _write_csv(tmp_path / "clash.csv", ["uri", "run_id", "catalog_run_id"], [["a.wav", "x", "y"]])
    with pytest.raises(CatalogError, match="collides"):
        read_catalog(str(tmp_path / "clash.csv"))


def test_unparsable_csv_row_is_rejected(music_root: Path) -> None:
    (music_root / "cat.csv").write_text("uri,title\na.wav,A\nsub/b.flac,B,extra,fields\nsub/d.opus,D\n")
    entries, rejected = read_catalog(str(music_root / "cat.csv"))
    assert [e.metadata["title"] for e in entries] == ["A", "D"]
    assert len(rejected) == 1 and "expected 2 columns, got 4" in rejected[0].message


def test_reserved_columns_renamed(tmp_path: Path) -> None:
    header = ["uri", "track_id", "duration_s", "run_id", "warnings", "layer_3", "model_id", "title", "layers"]
    _write_csv(tmp_path / "cat.csv", header, [["a.wav", "t1", "1", "r", "w", "l3", "m", "T", "x"]])
    (e,), _ = read_catalog(str(tmp_path / "cat.csv"))
    assert e.track_id == "t1"
    assert set(e.metadata) == {
        "catalog_duration_s",
        "catalog_run_id",
        "catalog_warnings",
        "catalog_layer_3",
        "catalog_model_id",
        "title",
        "layers",
    }


# ---------------------------------------------------------------------------------------------
# ids, duplicates, limits
# ---------------------------------------------------------------------------------------------


def test_stable_track_id() -> None:
    a = stable_track_id("/data/music/a.wav")
    assert ID_RE.match(a)
    assert a == stable_track_id("file:///data/music/a.wav") == stable_track_id("/data/music/./x/../a.wav")
    assert a != stable_track_id("/data/music/b.wav")
    assert stable_track_id("s3://b/k.wav") == stable_track_id("S3://b/k.wav")
    assert (
        stable_track_id("s3://b/k.wav") == "t_" + __import__("hashlib").sha1(b"s3://b/k.wav").hexdigest()[:16]
    )


def test_duplicate_ids_first_wins(music_root: Path) -> None:
    _write_csv(
        music_root / "cat.csv",
        ["track_id", "uri", "title"],
        [
            ["x", "a.wav", "first"],
            ["y", "a.wav", "same uri other id"],
            ["x", "sub/b.flac", "second"],
            ["", "a.wav", "derived"],
        ],
    )
    entries, rejected = read_catalog(str(music_root / "cat.csv"))
    assert [(e.track_id, e.metadata["title"]) for e in entries] == [
        ("x", "first"),
        ("y", "same uri other id"),
        (stable_track_id(str(music_root / "a.wav")), "derived"),
    ]
    (r,) = rejected
    assert (r.row, r.track_id, r.error_type) == (2, "x", "DuplicateTrackId")
    assert r.uri == str(music_root / "sub/b.flac")
    assert r.message.startswith("duplicate track_id 'x'")
    assert issubclass(DuplicateTrackId, CatalogError)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_duplicate_ids_far_apart_across_read_blocks(music_root: Path, fmt: str) -> None:
    """Ids repeated 50,000 rows apart (many read blocks / row groups / batches in between): the
    first row in catalog order wins, the later one is rejected, whatever the format."""
    n = 60_000
    ids = [f"id{i:05d}" for i in range(n)]
    ids[50_000] = ids[10]
    ids[59_999] = ids[50_001]
    uris = [f"f{i:05d}.wav" for i in range(n)]
    path = music_root / f"dup.{fmt}"
    if fmt == "csv":
        _write_csv(path, ["track_id", "uri"], [[a, b] for a, b in zip(ids, uris, strict=True)])
    elif fmt == "parquet":
        pq.write_table(pa.table({"track_id": ids, "uri": uris}), path, row_group_size=1000)
        assert pq.ParquetFile(path).num_row_groups == 60
    else:
        path.write_text(
            "".join(json.dumps({"track_id": a, "uri": b}) + "\n" for a, b in zip(ids, uris, strict=True))
        )
    entries, rejected = read_catalog(str(path), max_row_chars=256)  # small CSV read blocks
    assert len(entries) == n - 2 and len({e.track_id for e in entries}) == n - 2
    by_id = {e.track_id: e.uri for e in entries}
    assert by_id["id00010"] == str(music_root / "f00010.wav")
    assert by_id["id50001"] == str(music_root / "f50001.wav")
    assert [(r.row, r.track_id, r.error_type) for r in rejected] == [
        (50_000, "id00010", "DuplicateTrackId"),
        (59_999, "id50001", "DuplicateTrackId"),
    ]
    assert rejected[0].message == "duplicate track_id 'id00010': first used at row 10, which wins"
    assert rejected[0].uri == str(music_root / "f50000.wav")


def test_limit_and_streaming(music_root: Path) -> None:
    n = 5000
    _write_csv(music_root / "big.csv", ["uri", "i"], [[f"f{i:05d}.wav", str(i)] for i in range(n)])
    entries, _ = read_catalog(str(music_root / "big.csv"), limit=7)
    assert [e.metadata["i"] for e in entries] == [str(i) for i in range(7)]
    it = iter_catalog(str(music_root / "big.csv"))
    first = next(it)
    assert isinstance(first, CatalogEntry) and first.uri.endswith("f00000.wav")
    it.close()
    assert len(read_catalog(str(music_root / "big.csv"))[0]) == n
    assert read_catalog(str(music_root / "big.csv"), limit=0) == ([], [])


def test_max_row_chars(music_root: Path) -> None:
    _write_csv(music_root / "cat.csv", ["uri", "notes"], [["a.wav", "x" * 500], ["sub/b.flac", "short"]])
    entries, rejected = read_catalog(str(music_root / "cat.csv"), max_row_chars=200)
    assert [e.uri for e in entries] == [str(music_root / "sub/b.flac")]
    assert rejected[0].row == 0 and "over the limit of 200" in rejected[0].message
    (music_root / "cat.jsonl").write_text(
        json.dumps({"uri": "a.wav", "n": "y" * 5000}) + "\n" + json.dumps({"uri": "sub/b.flac"}) + "\n"
    )
    entries, rejected = read_catalog(str(music_root / "cat.jsonl"), max_row_chars=200)
    assert len(entries) == 1 and "row limit" in rejected[0].message


# ---------------------------------------------------------------------------------------------
# URI resolution and policy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "base", "expected"),
    [
        ("clips/a.ogg", "/data/music/catalog.csv", "/data/music/clips/a.ogg"),
        ("clips/a.ogg", "/data/music/", "/data/music/clips/a.ogg"),
        ("./clips/../clips/a.ogg", "/data/music/catalog.csv", "/data/music/clips/a.ogg"),
        ("/abs/b.wav", "/data/music/catalog.csv", "/abs/b.wav"),
        ("file:///abs/b.wav", "/data/music/catalog.csv", "/abs/b.wav"),
        ("file://localhost/abs/b.wav", "/data/music/catalog.csv", "/abs/b.wav"),
        ("clips/a.ogg", "file:///data/music/catalog.csv", "/data/music/clips/a.ogg"),
        ("clips/a.ogg", "s3://bucket/music/", "s3://bucket/music/clips/a.ogg"),
        ("clips/a.ogg", "s3://bucket/music/catalog.csv", "s3://bucket/music/clips/a.ogg"),
        ("clips/a.ogg", "s3://bucket", "s3://bucket/clips/a.ogg"),
        ("s3://other/x.wav", "/data/music/catalog.csv", "s3://other/x.wav"),
        ("gcs://b/x.wav", "/data/catalog.csv", "gs://b/x.wav"),
        ("  clips/a.ogg ", "/data/music/", "/data/music/clips/a.ogg"),
        ("../../x.wav", "s3://bucket/music/", "s3://x.wav"),  # escapes the bucket: the policy refuses it
    ],
)
def test_resolve_uri(ref: str, base: str, expected: str) -> None:
    assert resolve_uri(ref, base) == expected


def test_resolve_uri_local_dir_without_slash(music_root: Path) -> None:
    assert resolve_uri("a.wav", str(music_root)) == str(music_root / "a.wav")
    with pytest.raises(UriRefused):
        resolve_uri("", str(music_root))
    with pytest.raises(UriRefused, match="remote host"):
        resolve_uri("file://evil.example.com/etc/passwd", str(music_root))


def test_policy_prefix_matching(tmp_path: Path) -> None:
    (tmp_path / "music").mkdir()
    (tmp_path / "music2").mkdir()
    pol = UriPolicy(allowed_prefixes=(str(tmp_path / "music"), "s3://bucket/music"))
    assert pol.check(str(tmp_path / "music" / "a.wav")) == str(tmp_path / "music" / "a.wav")
    assert pol.check(f"file://{tmp_path}/music/x/../a.wav") == str(tmp_path / "music" / "a.wav")
    assert pol.check("s3://bucket/music/a.wav") == "s3://bucket/music/a.wav"
    for bad in (str(tmp_path / "music2" / "a.wav"), "s3://bucket/music2/a.wav", "s3://bucket2/music/a.wav"):
        with pytest.raises(UriRefused, match="outside the allowed prefixes"):
            pol.check(bad)
    with pytest.raises(UriRefused, match="path traversal"):
        pol.check(f"{tmp_path}/music/../music2/a.wav")
    with pytest.raises(UriRefused, match="path traversal"):
        pol.check("s3://bucket/music/../../bucket2/a.wav")
    with pytest.raises(UriRefused, match="not an absolute"):
        pol.check("music/a.wav")
    assert UriPolicy(allowed_prefixes=("s3://",)).check("s3://any/key.wav") == "s3://any/key.wav"
    assert UriPolicy(allowed_prefixes=("/",)).check("/etc/hosts") == "/etc/hosts"
    with pytest.raises(UriRefused):
        UriPolicy(allowed_prefixes=()).check(str(tmp_path / "music" / "a.wav"))
    with pytest.raises(UriRefused, match="scheme 's3' is not allowed"):
        UriPolicy(allowed_prefixes=("s3://bucket/",), allowed_schemes=("file",)).check("s3://bucket/a.wav")


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("http://example.com/a.mp3", "scheme 'http' is not allowed"),
        ("https://example.com/a.mp3", "scheme 'https' is not allowed"),
        ("ftp://example.com/a.mp3", "scheme 'ftp' is not allowed"),
        ("data:audio/wav;base64,UklGRg==", "scheme 'data' is not allowed"),
        ("", "empty uri"),
        ("   ", "empty uri"),
        ("/x/a\x00.wav", "NUL"),
        ("/x/a\n.wav", "control characters"),
        ("/x/" + "a" * 5000 + ".wav", "5007 characters, over the limit of 4096"),
    ],
)
def test_policy_refusals(uri: str, match: str) -> None:
    pol = UriPolicy(allowed_prefixes=("/x", "s3://b/"))
    with pytest.raises(UriRefused, match=match) as ei:
        pol.check(uri)
    assert ei.value.stage == "catalog" and len(str(ei.value)) <= 2000


def test_symlinks(music_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.wav"
    outside.write_bytes(b"RIFF")
    (music_root / "escape.wav").symlink_to(outside)
    (music_root / "etc_link").symlink_to("/etc")
    (music_root / "inside.wav").symlink_to(music_root / "sub" / "b.flac")
    pol = UriPolicy.for_catalog(str(music_root / "catalog.csv"))
    with pytest.raises(UriRefused, match="symlink escape"):
        pol.check(str(music_root / "escape.wav"))
    with pytest.raises(UriRefused, match="symlink escape"):
        pol.check(str(music_root / "etc_link" / "passwd"))
    assert pol.check(str(music_root / "inside.wav")) == str(music_root / "inside.wav")
    # a listing does not follow the symlinked directory and rejects the escaping file
    entries, rejected = read_catalog(str(music_root))
    assert [r.uri for r in rejected] == [str(music_root / "escape.wav")]
    assert rejected[0].error_type == "UriRefused"
    assert str(music_root / "inside.wav") in {e.uri for e in entries}


def test_refused_rows_in_a_catalog(music_root: Path, tmp_path: Path) -> None:
    (tmp_path / "outside.wav").write_bytes(b"RIFF")
    (music_root / "escape.wav").symlink_to(tmp_path / "outside.wav")
    refs = [
        ("ok", "a.wav"),
        ("passwd", "file:///etc/passwd"),
        ("http", "http://example.com/a.mp3"),
        ("trav", "../outside.wav"),
        ("trav2", "sub/../../outside.wav"),
        ("link", "escape.wav"),
        ("long", "a" * 5000 + ".wav"),
        ("empty", ""),
        ("s3", "s3://bucket/a.wav"),
        ("ok2", "sub/../sub/b.flac"),
    ]
    lines = [json.dumps({"track_id": t, "uri": u}) for t, u in refs]
    lines.append(json.dumps({"track_id": "nul", "uri": "a\u0000.wav"}))
    (music_root / "cat.jsonl").write_text("\n".join(lines) + "\n")
    entries, rejected = read_catalog(str(music_root / "cat.jsonl"))
    assert [(e.track_id, e.uri) for e in entries] == [
        ("ok", str(music_root / "a.wav")),
        ("ok2", str(music_root / "sub/b.flac")),
    ]
    by_id = {r.track_id: r for r in rejected}
    assert set(by_id) == {"passwd", "http", "trav", "trav2", "link", "long", "empty", "s3", "nul"}
    assert by_id["empty"].error_type == "CatalogError"
    for tid in ("passwd", "http", "trav", "trav2", "link", "long", "s3", "nul"):
        assert by_id[tid].error_type == "UriRefused", tid
    assert "outside the allowed prefixes" in by_id["passwd"].message
    assert "scheme 'http'" in by_id["http"].message
    assert by_id["trav"].message.startswith("path traversal")
    assert by_id["trav2"].message.startswith("path traversal")
    assert "symlink escape" in by_id["link"].message
    assert "over the limit of 4096" in by_id["long"].message and len(by_id["long"].uri) <= 4096
    assert "NUL" in by_id["nul"].message
    # extra prefixes widen the default policy
    pol = UriPolicy.for_catalog(str(music_root / "cat.jsonl"), extra_prefixes=("s3://bucket/",))
    entries, _ = read_catalog(str(music_root / "cat.jsonl"), policy=pol)
    assert "s3://bucket/a.wav" in {e.uri for e in entries}


def test_directory_listing(music_root: Path) -> None:
    entries, rejected = read_catalog(str(music_root))
    assert rejected == []
    expected = [
        music_root / "a.wav",
        music_root / "sub/b.flac",
        music_root / "sub/d.opus",
        music_root / "sub/deeper/c.OGG",
    ]
    assert [e.uri for e in entries] == [str(p) for p in expected]
    assert [e.track_id for e in entries] == [stable_track_id(str(p)) for p in expected]
    # stable across calls and with a trailing slash / file:// form
    again, _ = read_catalog(f"file://{music_root}/")
    assert again == entries
    assert read_catalog(str(music_root), limit=2)[0] == entries[:2]
    assert read_catalog(music_root)[0] == entries  # a Path is accepted too


def test_pickle_round_trip(music_root: Path) -> None:
    import pickle

    pol = UriPolicy.for_catalog(str(music_root), extra_prefixes=("s3://b/",))
    back = pickle.loads(pickle.dumps(pol))
    assert back == pol and back.check(str(music_root / "a.wav")) == str(music_root / "a.wav")
    assert back.check("s3://b/x.wav") == "s3://b/x.wav"
    entries, _ = read_catalog(str(music_root))
    assert pickle.loads(pickle.dumps(entries)) == entries
    for exc in (UriRefused("u"), FetchError("f"), CatalogError("c"), DuplicateTrackId("d")):
        back_exc = pickle.loads(pickle.dumps(exc))
        assert type(back_exc) is type(exc) and str(back_exc) == str(exc)


def test_normalize_uri() -> None:
    assert normalize_uri("/a/./b/../c.wav") == "/a/c.wav"
    assert normalize_uri("S3://Bucket/a//b/./c.wav") == "s3://Bucket/a/b/c.wav"
    assert normalize_uri("s3://bucket/prefix/") == "s3://bucket/prefix/"
    assert normalize_uri("gcs://b/x") == "gs://b/x"


# ---------------------------------------------------------------------------------------------
# local storage: content_version and fetch_bytes
# ---------------------------------------------------------------------------------------------


def test_local_content_version_and_fetch(tmp_path: Path) -> None:
    p = tmp_path / "a.wav"
    p.write_bytes(b"x" * 100)
    v1 = content_version(str(p))
    st = p.stat()
    assert v1 == f"{st.st_size}-{st.st_mtime_ns}"
    data, v = fetch_bytes(str(p))
    assert data == b"x" * 100 and v == v1
    time.sleep(0.01)
    p.write_bytes(b"y" * 101)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert content_version(str(p)) != v1
    fs, path = open_uri(f"file://{p}")
    assert content_version(str(p), fs=fs) == content_version(str(p))
    with pytest.raises(FetchError, match="not found") as ei:
        fetch_bytes(str(tmp_path / "missing.wav"))
    assert ei.value.stage == "fetch"
    with pytest.raises(FetchError, match="is a directory"):
        fetch_bytes(str(tmp_path))
    with pytest.raises(FetchError, match="over the 50-byte limit"):
        fetch_bytes(str(p), max_bytes=50)
    with pytest.raises(FetchError, match="not found"):
        content_version(str(tmp_path / "missing.wav"))
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    with pytest.raises(FetchError, match="not a regular file"):
        fetch_bytes(str(fifo))


# ---------------------------------------------------------------------------------------------
# redaction and error helpers
# ---------------------------------------------------------------------------------------------


def test_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SuperSecretValue123")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz")
    text = (
        "failed s3://AKIAEXAMPLE:SuperSecretValue123@bucket/k.wav "
        "https://h/x?token=abc123&part=2&X-Amz-Signature=deadbeef "
        '{"secret": "s3cr3t", "key": "AKIA2", "title": "ok"} password=hunter2 '
        "hf=hf_abcdefghijklmnopqrstuvwxyz aws_secret_access_key=zzz"
    )
    out = redact(text)
    for secret in (
        "SuperSecretValue123",
        "AKIAEXAMPLE",
        "abc123",
        "deadbeef",
        "s3cr3t",
        "AKIA2",
        "hunter2",
        "hf_abcdefghij",
        "zzz",
    ):
        assert secret not in out, (secret, out)
    assert "part=2" in out and '"title": "ok"' in out and "bucket/k.wav" in out
    assert redact("") == ""
    assert redact('{"password": 12345, "n": 1}') == '{"password": ***, "n": 1}'
    assert redact("monkey=banana") == "monkey=banana"
    err = FetchError("bad\nthing token=abc SuperSecretValue123")
    assert str(err) == "bad thing token=*** ***"
    assert error_type(err) == "FetchError" and isinstance(err, PipelineError)


def test_error_stages() -> None:
    assert (CatalogError.stage, UriRefused.stage, FetchError.stage, PipelineError.stage) == (
        "catalog",
        "catalog",
        "fetch",
        "pipeline",
    )


# ---------------------------------------------------------------------------------------------
# S3 (moto server: a real S3 API over HTTP)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_bucket(s3_server: str, audio_dir: Path) -> dict:
    """Bucket 'music' with clips/, catalog.csv (relative uris), catalog.parquet and a subfolder."""

    s3 = s3_server.client()
    s3.create_bucket(Bucket="music")
    names = ["hw_fruit.ogg", "lc_lincity.wav", "hw_oriental.flac"]
    for name in names:
        s3.upload_file(str(audio_dir / "clips" / name), "music", f"lib/clips/{name}")
    rows = [["fruit", "clips/hw_fruit.ogg", "Fruit"], ["lincity", "clips/lc_lincity.wav", "Lincity"]]
    rows += [
        ["abs", "s3://music/lib/clips/hw_oriental.flac", "Oriental"],
        ["other", "s3://elsewhere/x.wav", "X"],
    ]
    rows += [
        ["trav", "../../secret/x.wav", "T"],
        ["web", "https://example.com/x.wav", "W"],
        ["fruit", "clips/hw_oriental.flac", "dup"],
    ]
    body = "track_id,uri,title\n" + "".join(",".join(r) + "\n" for r in rows)
    s3.put_object(Bucket="music", Key="lib/catalog.csv", Body=body.encode())
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": ["clips/hw_fruit.ogg"], "year": [2011]}), buf)
    s3.put_object(Bucket="music", Key="lib/catalog.parquet", Body=buf.getvalue().to_pybytes())
    s3.put_object(Bucket="music", Key="lib/catalog.jsonl", Body=b'{"uri": "clips/lc_lincity.wav", "n": 1}\n')
    return {"client": s3, "endpoint": s3_server, "so": {"endpoint_url": s3_server}, "names": names}


def test_s3_catalog_csv(s3_bucket: dict) -> None:
    entries, rejected = read_catalog("s3://music/lib/catalog.csv", storage_options=s3_bucket["so"])
    assert [(e.track_id, e.uri, e.metadata) for e in entries] == [
        ("fruit", "s3://music/lib/clips/hw_fruit.ogg", {"title": "Fruit"}),
        ("lincity", "s3://music/lib/clips/lc_lincity.wav", {"title": "Lincity"}),
        ("abs", "s3://music/lib/clips/hw_oriental.flac", {"title": "Oriental"}),
    ]
    assert [(r.track_id, r.error_type) for r in rejected] == [
        ("other", "UriRefused"),
        ("trav", "UriRefused"),
        ("web", "UriRefused"),
        ("fruit", "DuplicateTrackId"),
    ]
    assert rejected[1].message.startswith("path traversal")


def test_s3_catalog_parquet_jsonl_and_listing(s3_bucket: dict) -> None:
    so = s3_bucket["so"]
    (e,), _ = read_catalog("s3://music/lib/catalog.parquet", storage_options=so)
    assert e.uri == "s3://music/lib/clips/hw_fruit.ogg" and e.metadata == {"year": "2011"}
    (e,), _ = read_catalog("s3://music/lib/catalog.jsonl", storage_options=so)
    assert e.uri == "s3://music/lib/clips/lc_lincity.wav" and e.metadata == {"n": "1"}
    listed, rejected = read_catalog("s3://music/lib/", storage_options=so)
    assert rejected == []
    assert [x.uri for x in listed] == [f"s3://music/lib/clips/{n}" for n in sorted(s3_bucket["names"])]
    assert all(x.track_id == stable_track_id(x.uri) for x in listed)
    with pytest.raises(CatalogError, match="catalog not found"):
        read_catalog("s3://music/lib/nope.csv", storage_options=so)


def test_s3_fetch_and_content_version(
    s3_bucket: dict, audio_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.io.audio import decode_audio

    s3, so = s3_bucket["client"], s3_bucket["so"]
    uri = "s3://music/lib/clips/hw_fruit.ogg"
    data, version = fetch_bytes(uri, storage_options=so)
    assert data == (audio_dir / "clips" / "hw_fruit.ogg").read_bytes()
    etag = s3.head_object(Bucket="music", Key="lib/clips/hw_fruit.ogg")["ETag"].strip('"')
    assert version == etag == content_version(uri, storage_options=so)
    assert '"' not in version
    assert decode_audio(data).duration_s == pytest.approx(20.0, abs=1e-3)
    # endpoint from the environment instead of storage_options
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket["endpoint"])
    assert content_version(uri) == etag
    # a rewrite changes the version
    s3.put_object(Bucket="music", Key="lib/clips/changed.wav", Body=b"one")
    v1 = content_version("s3://music/lib/clips/changed.wav", storage_options=so)
    s3.put_object(Bucket="music", Key="lib/clips/changed.wav", Body=b"two!")
    assert content_version("s3://music/lib/clips/changed.wav", storage_options=so) != v1
    s3.delete_object(Bucket="music", Key="lib/clips/changed.wav")


def test_s3_fetch_errors(s3_bucket: dict) -> None:
    so = s3_bucket["so"]
    with pytest.raises(FetchError, match="not found"):
        fetch_bytes("s3://music/lib/clips/missing.ogg", storage_options=so)
    with pytest.raises(FetchError, match="not found"):
        fetch_bytes("s3://no-such-bucket/x.ogg", storage_options=so)
    with pytest.raises(FetchError, match="is a directory"):
        fetch_bytes("s3://music/lib/clips", storage_options=so)
    with pytest.raises(FetchError, match="over the 1000-byte limit"):
        fetch_bytes("s3://music/lib/clips/hw_fruit.ogg", storage_options=so, max_bytes=1000)


@pytest.mark.timeout(60)
def test_s3_unreachable_endpoint_retries_then_fails() -> None:
    from tools.testkit.net import free_port

    port = free_port()
    so = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "AKIAUNREACHABLE",
        "secret": "VerySecretValue",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="after 3 tries") as ei:
        fetch_bytes("s3://music/x.wav", storage_options=so, backoff_s=0.05)
    assert time.monotonic() - t0 < 30
    assert "VerySecretValue" not in str(ei.value) and "AKIAUNREACHABLE" not in str(ei.value)


def test_retry_helper_recovers() -> None:
    from pipeline.io.objects import with_retries

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert with_retries(flaky, "x", tries=3, backoff_s=0.001) == "ok" and len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("x")

    calls.clear()
    with pytest.raises(FetchError, match="not found"):
        with_retries(missing, "x", tries=3, backoff_s=0.001)
    assert len(calls) == 1  # permanent errors are not retried


def test_rejected_row_shape() -> None:
    r = RejectedRow(row=1, track_id=None, uri=None, error_type="UriRefused", message="m")
    assert r.row == 1 and r.error_type == "UriRefused"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_streaming_reads_only_what_it_needs(tmp_path: Path, fmt: str) -> None:
    """A ~20 MB catalog: taking the first entries allocates a small fraction of the file."""
    n = 50_000
    rng = np.random.default_rng(0)
    pads = [rng.bytes(200).hex() for _ in range(n)]  # incompressible, 400 chars
    path = tmp_path / f"big.{fmt}"
    if fmt == "csv":
        with open(path, "w") as f:
            f.write("uri,notes\n")
            f.writelines(f"f{i}.wav,{pads[i]}\n" for i in range(n))
    elif fmt == "parquet":
        table = pa.table({"uri": [f"f{i}.wav" for i in range(n)], "notes": pads})
        pq.write_table(table, path, row_group_size=2000, compression="none")
        del table
    else:
        with open(path, "w") as f:
            f.writelines(json.dumps({"uri": f"f{i}.wav", "notes": pads[i]}) + "\n" for i in range(n))
    del pads
    size = path.stat().st_size
    assert size > 20e6
    # max_row_chars sets the CSV block size, and pyarrow reads ahead a fixed number of blocks
    peak, got = traced_peak(
        """
        import pyarrow as pa
        from pipeline.io.catalog import read_catalog
        def first_three(path):
            pool0 = pa.total_allocated_bytes()
            entries, _ = read_catalog(path, limit=3, max_row_chars=2000)
            return {"uris": [e.uri for e in entries], "arrow": pa.total_allocated_bytes() - pool0}
        first_three(PATH)  # untraced: the lazy imports of the first read are not the catalog's
        """.replace("PATH", repr(str(path))),
        f"first_three({str(path)!r})",
    )
    assert got["uris"] == [str(tmp_path / f"f{i}.wav") for i in range(3)]
    assert peak < size / 4, (peak, size)
    assert got["arrow"] < size / 4


def test_catalog_parts_read_like_the_whole_catalog(music_root: Path, tmp_path: Path) -> None:
    """A catalog split into parts (a listing by sub-directory, a Parquet file by row groups) reads
    the same records in the same order as the whole catalog, each part on its own."""
    from pipeline.io.catalog import CatalogPart, catalog_parts, iter_part, open_catalog

    (music_root / "zeta").mkdir()
    (music_root / "zeta" / "z.mp3").write_bytes(b"ID3")
    (music_root / ".hidden-dir").mkdir()
    (music_root / ".hidden-dir" / "h.wav").write_bytes(b"RIFF")
    src = open_catalog(str(music_root))
    parts = catalog_parts(src)
    assert [(p.path, p.top_only) for p in parts] == [
        (str(music_root), True), (str(music_root / "sub"), False), (str(music_root / "zeta"), False)]  # fmt: skip
    split = [rec["uri"] for p in parts for _, rec in iter_part(src, p)]
    whole = [rec["uri"] for _, rec in iter_part(src, CatalogPart())]
    assert split == whole == [e.uri for e in read_catalog(str(music_root))[0]]
    assert len(whole) == 5 and not any("hidden" in u for u in whole)

    rows = [{"track_id": f"t{i}", "uri": str(music_root / "a.wav")} for i in range(25)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cat.parquet", row_group_size=4)  # 7 groups
    src = open_catalog(str(tmp_path / "cat.parquet"))
    parts = catalog_parts(src, rows_per_part=10)
    assert [p.row_groups for p in parts] == [(0, 1, 2), (3, 4, 5), (6,)]
    assert [p.first_row for p in parts] == [0, 12, 24]
    split = [(ix, rec["track_id"]) for p in parts for ix, rec in iter_part(src, p)]
    assert split == [(i, f"t{i}") for i in range(25)]
    (tmp_path / "cat.csv").write_text("uri\na.wav\n")
    assert catalog_parts(open_catalog(str(tmp_path / "cat.csv"))) == [CatalogPart()]  # one reader


def test_s3_listing_parts(s3_bucket: dict) -> None:
    """An object-store prefix splits by sub-prefix (one LIST of the top level) and its parts list
    the same objects as the whole listing."""
    from pipeline.io.catalog import CatalogPart, catalog_parts, iter_part, open_catalog

    src = open_catalog("s3://music/lib/", storage_options=s3_bucket["so"])
    parts = catalog_parts(src)
    assert [p.top_only for p in parts] == [True] + [False] * (len(parts) - 1) and len(parts) >= 2
    split = [rec["uri"] for p in parts for _, rec in iter_part(src, p)]
    assert split == [rec["uri"] for _, rec in iter_part(src, CatalogPart())]
    assert split == [f"s3://music/lib/clips/{n}" for n in sorted(s3_bucket["names"])]
