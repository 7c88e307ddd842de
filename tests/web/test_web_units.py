"""Pieces of the web layer without a browser: Range parsing, the prefix index, the Serve options and
the flags of jobs/serve_search.py (one-line errors, exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.search.catalog_views import TitleIndex, content_type_for
from pipeline.search.web import deployment_options, parse_range
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-", (0, 999)),
        ("bytes=100-199", (100, 199)),
        ("bytes=900-5000", (900, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-5000", (0, 999)),
        ("bytes=1000-", "unsatisfiable"),
        ("bytes=-0", "unsatisfiable"),
        ("bytes=200-100", "unsatisfiable"),
        ("bytes=0-1,5-6", None),  # several ranges: the whole object
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header, expected) -> None:
    assert parse_range(header, 1000) == expected


def test_title_index_prefix_matches_words_of_title_artist_and_id() -> None:
    idx = TitleIndex(
        ["hw_city", "lc_city_blues", "fb_introzik", "x1"],
        ["City", "City Blues", "Frozen Bubble intro", "<img src=x onerror=alert(1)>"],
        ["HSR", "Robert van Herk", "The Frozen-Bubble Team", None],
    )
    ids = lambda q: [idx.track_ids[r] for r in idx.search(q)]  # noqa: E731
    assert ids("cit") == ["hw_city", "lc_city_blues"]
    assert ids("city bl") == ["lc_city_blues"]
    assert ids("BUBBLE fro") == ["fb_introzik"]
    assert ids("van herk") == ["lc_city_blues"]
    assert ids("hw_ci") == ["hw_city"]
    assert ids("onerror") == ["x1"]
    assert ids("zzz") == [] and ids("") == []


def test_content_types() -> None:
    assert content_type_for("/a/b.WAV") == "audio/wav"
    assert content_type_for("s3://b/k.opus") == "audio/ogg"
    assert content_type_for("/a/b.mp3") == "audio/mpeg"
    assert content_type_for("/a/b.xyz") == "application/octet-stream"


def test_deployment_options_fixed_and_autoscaling() -> None:
    fixed = deployment_options((2, 2), 32, 16, retry_after_s=2)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert (fixed["max_ongoing_requests"], fixed["max_queued_requests"]) == (32, 16)
    assert fixed["backpressure_config"] == {"status_code": 503, "retry_after_s": 2.0}
    auto = deployment_options((1, 4), 64, 128)
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"]["min_replicas"] == 1 and auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 32


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--replicas", "0"], "--replicas: expected 1 <= MIN <= MAX"),
        (["--replicas", "4-2"], "--replicas: expected 1 <= MIN <= MAX"),
        (["--replicas", "two"], "--replicas: expected N or MIN-MAX"),
        (["--max-ongoing", "0"], "--max-ongoing"),
        (["--cors-origin", "*"], "--cors-origin: expected an origin"),
        (["--auth-token-file", "/no/such/file"], "--auth-token-file: cannot read /no/such/file"),
        (["--upload-timeout-s", "0"], "--upload-timeout-s must be > 0"),
    ],
)
def test_serve_search_bad_flags_are_one_line_errors(tmp_path, flags, needle) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "serve_search.py"), "--store", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve_search: error: ") and needle in lines[0], r.stderr


def test_short_token_file_is_refused(tmp_path) -> None:
    tok = tmp_path / "token"
    tok.write_text("short\n")
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "serve_search.py"),
            "--store",
            str(tmp_path),
            "--auth-token-file",
            str(tok),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "shorter than 16 characters" in r.stderr and "short\n" not in r.stderr
