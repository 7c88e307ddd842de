"""Hostile catalogs without Ray: every URI trick against the policy, duplicate ids, odd strings,
missing columns, input-limit flags, and a large catalog streamed with bounded memory.

(The same kinds of rows also go through a real run in test_faults.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import CatalogError, UriRefused
from pipeline.io.catalog import read_catalog
from pipeline.io.uris import UriPolicy, resolve_uri
from tests.conftest import REPO
from tools.testkit.reliability import write_catalog

RLO, ALEF, COMBINING, EMOJI = "\u202e", "\u05d0", "e\u0301", "\U0001f3b5"


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "music"
    (r / "sub").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "x.wav").write_bytes(b"RIFF")
    (tmp_path / "music2").mkdir()
    (r / "ok.wav").write_bytes(b"RIFF")
    os.symlink(tmp_path / "secret" / "x.wav", r / "link.wav")  # file symlink escaping
    os.symlink(tmp_path / "secret", r / "linkdir")  # directory symlink escaping
    os.symlink(r / "ok.wav", r / "inner_link.wav")  # symlink staying inside: fine
    return r


REFUSED = [
    # (catalog value, words expected in the reason)
    ("file:///etc/passwd", "outside the allowed prefixes"),
    ("FILE:///etc/passwd", "outside the allowed prefixes"),
    ("file://otherhost/etc/passwd", "remote host"),
    ("/etc/passwd", "outside the allowed prefixes"),
    ("../secret/x.wav", "path traversal"),
    ("sub/../../secret/x.wav", "path traversal"),
    ("./../secret/x.wav", "path traversal"),
    ("sub/../../music2/a.wav", "path traversal"),  # sibling sharing the prefix "music"
    ("link.wav", "symlink escape"),
    ("linkdir/x.wav", "symlink escape"),
    ("http://127.0.0.1/a.wav", "scheme 'http'"),
    ("https://example.com/a.wav", "scheme 'https'"),
    ("ftp://example.com/a.wav", "scheme 'ftp'"),
    ("data:audio/wav;base64,UklGRg==", "scheme 'data'"),
    ("javascript:alert(1)", "scheme 'javascript'"),
    ("memory://x.wav", "scheme 'memory'"),
    ("hdfs://nn/x.wav", "scheme 'hdfs'"),
    ("C:\\Windows\\x.wav", "scheme 'c'"),
    ("s3://bucket/music/../secret/x.wav", "outside the allowed prefixes"),
    ("s3://other-bucket/x.wav", "outside the allowed prefixes"),
    ("ok.wav\x00.txt", "NUL"),
    ("ok\n.wav", "control characters"),
    ("ok\x1b[2J.wav", "control characters"),
    ("a" * 5000 + ".wav", "over the limit of 4096"),
]

ACCEPTED = [
    "ok.wav",
    "./ok.wav",
    "sub/../ok.wav",  # a '..' that stays inside is normalized away
    "inner_link.wav",
    f"{RLO}vaw.exe",  # right-to-left override: just a (strange) name
    f"{ALEF}{EMOJI}{COMBINING}.flac",
    "..%2f..%2fsecret/x.wav",  # no decoding: a literal file name inside the root
    "..\\..\\secret\\x.wav",  # backslashes are name characters on POSIX
    "\uff0e\uff0e\uff0fsecret/x.wav",  # full-width dots and solidus: literal names
]


@pytest.mark.parametrize("value, why", REFUSED, ids=[r[1][:20] + str(i) for i, r in enumerate(REFUSED)])
def test_uri_policy_refuses(root: Path, value: str, why: str) -> None:
    policy = UriPolicy.for_catalog(str(root / "catalog.csv"))
    with pytest.raises(UriRefused) as ei:
        policy.check(resolve_uri(value, str(root / "catalog.csv")))
    assert why in str(ei.value) or (why == "path traversal" and "outside" in str(ei.value)), str(ei.value)
    assert "\n" not in str(ei.value)


def test_uri_policy_refuses_via_catalog_with_reasons(root: Path) -> None:
    """The same values as catalog rows: each a RejectedRow with its reason, nothing read."""
    rows = [{"track_id": f"r{i}", "uri": v} for i, (v, _) in enumerate(REFUSED)]
    rows += [{"track_id": f"a{i}", "uri": v} for i, v in enumerate(ACCEPTED)]
    cat = write_catalog(root / "catalog.csv", rows, ["track_id", "uri"])
    entries, rejected = read_catalog(str(cat))
    by_id = {r.track_id: r for r in rejected}
    for i, (_value, why) in enumerate(REFUSED):
        r = by_id.get(f"r{i}")
        assert r is not None, f"r{i} accepted"
        if why not in ("NUL", "control characters"):
            assert why in r.message or "outside" in r.message, (i, r.message)
        assert r.error_type in ("UriRefused", "CatalogError")
    assert {e.track_id for e in entries} == {f"a{i}" for i in range(len(ACCEPTED))}
    for e in entries:
        assert e.uri.startswith(str(root) + "/")


def test_scheme_and_prefix_matching_is_per_component() -> None:
    p = UriPolicy(allowed_prefixes=("s3://bucket/music", "/data/music"))
    assert p.check("s3://bucket/music/a.wav") == "s3://bucket/music/a.wav"
    for bad in (
        "s3://bucket/music2/a.wav",
        "s3://bucket/musicx",
        "/data/music2/a.wav",
        "s3://bucketx/music/a",
    ):
        with pytest.raises(UriRefused):
            p.check(bad)
    with pytest.raises(ValueError):
        UriPolicy(allowed_prefixes=("/data\x00/x",))


def test_duplicates_first_wins_and_odd_strings_survive(tmp_path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    odd_title = f"{RLO}{ALEF}{EMOJI}{COMBINING}\u200b\ufeff zero-width, BOM, tab\there"
    rows = [
        {"track_id": "dup", "uri": "a.wav", "title": "first"},
        {"track_id": "other", "uri": "a.wav", "title": "same uri, other id: allowed"},
        {"track_id": "dup", "uri": "b.wav", "title": "second"},
        {"track_id": "dup", "uri": "c.wav", "title": "third"},
        {"track_id": f"{EMOJI}{ALEF}", "uri": "d.wav", "title": odd_title},
        {"track_id": "", "uri": "e.wav", "title": "empty id: a stable one is derived"},
        {"track_id": "x" * 600, "uri": "f.wav", "title": "over-long id"},
        {"track_id": "nul\x00", "uri": "g.wav", "title": "NUL in the id"},
        {"track_id": "big_title", "uri": "h.wav", "title": "y" * 70000},  # over the default row limit
    ]
    cat = write_catalog(d / "catalog.csv", rows)
    entries, rejected = read_catalog(str(cat))
    ids = [e.track_id for e in entries]
    assert ids[:2] == ["dup", "other"] and entries[0].metadata["title"] == "first"
    dups = [r for r in rejected if r.error_type == "DuplicateTrackId"]
    assert len(dups) == 2 and all("first used at row 0, which wins" in r.message for r in dups)
    odd = next(e for e in entries if e.track_id == f"{EMOJI}{ALEF}")
    assert odd.metadata["title"] == odd_title  # kept byte for byte
    assert any(i.startswith("t_") for i in ids)  # derived id for the empty one
    msgs = " | ".join(r.message for r in rejected)
    assert "invalid track_id" in msgs and "over the limit of 65536" in msgs


def test_missing_columns_and_broken_rows(tmp_path) -> None:
    p = tmp_path / "nouri.csv"
    p.write_text("track_id,path\na,b.wav\n")
    with pytest.raises(CatalogError, match="no 'uri' column"):
        read_catalog(str(p))
    p = tmp_path / "dupcols.csv"
    p.write_text("uri,uri\na.wav,b.wav\n")
    with pytest.raises(CatalogError, match="duplicate column"):
        read_catalog(str(p))
    p = tmp_path / "ragged.csv"
    p.write_text("track_id,uri,title\na,a.wav,A\nb\nc,c.wav,C,extra\nd,d.wav,D\n")
    entries, rejected = read_catalog(str(p))
    assert [e.track_id for e in entries] == ["a", "d"]
    assert all("unparsable CSV row" in r.message for r in rejected) and len(rejected) == 2
    p = tmp_path / "rows.jsonl"
    p.write_text(
        '{"track_id": "a", "uri": "a.wav"}\n{"track_id": "b"}\nnot json\n[1, 2]\n'
        '{"track_id": "c", "uri": null}\n{"track_id": "d", "uri": "d.wav", "uri ": "x"}\n'
    )
    entries, rejected = read_catalog(str(p))
    assert [e.track_id for e in entries] == ["a"]
    assert len(rejected) == 5
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(CatalogError, match="empty"):
        read_catalog(str(p))
    p = tmp_path / "header_only.csv"
    p.write_text("uri\n")
    assert read_catalog(str(p)) == ([], [])


def test_input_limit_flags_reach_the_job(tmp_path) -> None:
    from jobs.embed_catalog import build_parser
    from pipeline.runs.settings import embed_job_from_args

    args = build_parser().parse_args(
        ["--catalog", "c.csv", "--output", "o", "--max-file-mb", "1.5", "--max-duration-s", "30"]
        + ["--max-channels", "4", "--max-row-chars", "2000", "--decode-timeout-s", "5"]
    )
    job = embed_job_from_args(args)
    assert job.limits.max_bytes == int(1.5 * 1024 * 1024) and job.limits.max_duration_s == 30.0
    assert job.limits.max_channels == 4 and job.max_row_chars == 2000 and job.decode_timeout_s == 5.0
    for bad in (["--max-row-chars", "0"], ["--max-channels", "-1"], ["--max-file-mb", "nan"]):
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "jobs" / "embed_catalog.py"),
                "--catalog",
                "c",
                "--output",
                "o",
                *bad,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("embed_catalog: error: argument " + bad[0]), r.stderr


# --------------------------------------------------------------------------- large catalogs

_MEASURE = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
from pipeline.io.catalog import CatalogEntry, iter_catalog
import pyarrow, pyarrow.csv, pyarrow.compute  # imported before the baseline: not the catalog's cost
def status(key):  # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec (the parent's peak)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
base = status("VmRSS")
n = rej = 0
for e in iter_catalog(sys.argv[1], max_row_chars=int(sys.argv[2])):
    if isinstance(e, CatalogEntry):
        n += 1
    else:
        rej += 1
print(json.dumps({"entries": n, "rejected": rej, "growth": status("VmHWM") - base}))
"""


def _big_catalog(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("track_id,uri,title,artist\n")
        for i in range(n):
            f.write(f"id{i:08d},audio/{i % 1000:03d}/track_{i:08d}.flac,Title {i} {EMOJI},Artist {i % 977}\n")
            if i % 50_000 == 7:  # a few hostile rows along the way
                f.write(f"id{i:08d},dup.flac,duplicate,x\nbad{i},../../etc/passwd,y,z\n")


def _stream(path: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), "65536", str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(r.stdout)


# streaming costs a constant (pyarrow read-ahead, ~40 MB) plus the duplicate-id index
# (~125 bytes per distinct track id); entries are never accumulated
CONSTANT_BYTES, PER_ROW_BYTES = 64 * 1024**2, 300


def test_catalog_100k_rows_streams_in_bounded_memory(tmp_path) -> None:
    n = 100_000
    _big_catalog(tmp_path / "big.csv", n)
    got = _stream(tmp_path / "big.csv")
    assert got["entries"] == n and got["rejected"] == 2 * 2
    assert got["growth"] < CONSTANT_BYTES + PER_ROW_BYTES * n, got
    print(f"100k rows: +{got['growth'] / 1024**2:.0f} MB")


@pytest.mark.slow
def test_catalog_1m_rows_streams_in_bounded_memory(tmp_path) -> None:
    n = 1_000_000
    _big_catalog(tmp_path / "big.csv", n)
    got = _stream(tmp_path / "big.csv")
    assert got["entries"] == n and got["rejected"] == 2 * 20
    assert got["growth"] < CONSTANT_BYTES + PER_ROW_BYTES * n, got
    print(f"1M rows: +{got['growth'] / 1024**2:.0f} MB")
