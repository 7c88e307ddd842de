"""Worker faults, hostile catalog rows and input limits in ONE embed run (CI budget), checked from
several angles; the driver killed mid-run is in test_store_durability.py.

The run: 24 good tracks (one of 20 windows, so its decode output spans two blocks), a poison file
that segfaults the decode worker every time, one decode actor and one model actor SIGKILLed
mid-run, every kind of hostile catalog row, and one file over each input limit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import pipeline.flow.stages
from pipeline.flow.runtime import ACTOR_MAX_TASK_RETRIES, DECODE_MAX_CRASHES
from pipeline.io.audio import AudioLimits
from pipeline.runs.embed import run_embed
from pipeline.runs.settings import EmbedJob
from tools.testkit.reliability import (
    ActorKiller,
    CrashingDecodeStage,
    check_store,
    job_kwargs,
    store_tables,
    tone,
    write_catalog,
    write_tracks,
)

UNICODE_NAME = "\u0646\u0627\u064a \U0001f3b5 e\u0301 \u202etxt.wav"  # RTL, emoji, combining, RLO


def _hostile_catalog(d: Path, outside: Path) -> tuple[Path, set[str], dict[str, tuple[str, str]]]:
    """(catalog, good track ids, {bad track id or row marker: (stage, error_type)})."""
    good = write_tracks(d, 22, seconds=2.0)
    sf.write(d / "long_good.flac", tone(20.0, 24000, 1, seed=99), 24000)  # 20 windows: 2 decode blocks
    good["long_good"] = "long_good.flac"
    sf.write(d / UNICODE_NAME, tone(2.0, 24000, 2, seed=7), 24000)
    good["uni_\u05e9\u05dc\u05d5\u05dd_\U0001f3b8"] = UNICODE_NAME  # Hebrew + emoji track id
    sf.write(d / "POISON.wav", tone(2.0, seed=5), 24000)
    # over the limits of this run: 1 MB, 30 s, 4 channels, 2000-character rows
    sf.write(d / "big.wav", np.zeros((300_000, 1), np.float32), 24000, subtype="FLOAT")  # 1.2 MB
    sf.write(d / "long.wav", tone(40.0, 1000, 1), 1000, subtype="PCM_U8")  # 40 s, 40 kB
    sf.write(d / "six.wav", tone(0.5, 24000, 6), 24000)
    sf.write(outside / "elsewhere.wav", tone(2.0), 24000)  # valid audio, but outside the root
    os.symlink(outside / "elsewhere.wav", d / "escape.wav")
    rows = [{"track_id": k, "uri": v, "title": f"title {k}"} for k, v in good.items()]
    bad = {
        "poison": ("POISON.wav", "decode", "WorkerCrashed"),
        "big": ("big.wav", "fetch", "FetchError"),
        "long": ("long.wav", "decode", "DecodeError"),
        "six": ("six.wav", "decode", "DecodeError"),
        "etc": ("file:///etc/passwd", "catalog", "UriRefused"),
        "abs_outside": (str(outside / "elsewhere.wav"), "catalog", "UriRefused"),
        "dotdot": ("../outside/elsewhere.wav", "catalog", "UriRefused"),
        "dotdot_mid": ("sub/../../outside/elsewhere.wav", "catalog", "UriRefused"),
        "symlink": ("escape.wav", "catalog", "UriRefused"),
        "http": ("http://127.0.0.1:9/a.wav", "catalog", "UriRefused"),
        "ftp": ("ftp://example.com/a.wav", "catalog", "UriRefused"),
        "data": ("data:audio/wav;base64,UklGRg==", "catalog", "UriRefused"),
        "s3_other": ("s3://someone-elses-bucket/a.wav", "catalog", "UriRefused"),
        "nul_uri": ("t00000.wav\x00.txt", "catalog", "UriRefused"),
        "huge_uri": ("a" * 5000 + ".wav", "catalog", "CatalogError"),  # over the 2000-char row limit
        "empty_uri": ("", "catalog", "CatalogError"),
        "spaces_uri": ("   ", "catalog", "CatalogError"),
        "missing": ("no_such_file.wav", "fetch", "FetchError"),
        "dir": ("adir.wav", "fetch", "FetchError"),
        "t00001": ("t00002.wav", "catalog", "DuplicateTrackId"),  # duplicate id: first row wins
    }
    (d / "adir.wav").mkdir()
    rows += [{"track_id": k, "uri": u, "title": "x"} for k, (u, _s, _t) in bad.items()]
    rows.append({"track_id": "wide_row", "uri": "t00003.wav", "title": "w" * 3000})  # > --max-row-chars
    rows.append({"track_id": "nul\x00id", "uri": "t00004.wav", "title": "NUL in the id"})
    bad_rows = {k: (s, t) for k, (_u, s, t) in bad.items()}
    bad_rows["wide_row"] = ("catalog", "CatalogError")
    path = write_catalog(d / "catalog.csv", rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write("short_row_only_one_field\n")  # a row with missing columns
        f.write('"unterminated,t00005.wav,x\n')
    return path, set(good), bad_rows


@pytest.fixture(scope="module")
def fault_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    d, outside = root / "cat", root / "outside"
    d.mkdir()
    outside.mkdir()
    catalog, good, bad = _hostile_catalog(d, outside)
    out = root / "store"
    job = EmbedJob(
        catalog=str(catalog),
        output=str(out),
        **job_kwargs(
            limits=AudioLimits(max_bytes=1024 * 1024, max_duration_s=30.0, max_channels=4),
            max_row_chars=2000,
        ),
    )
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline.flow.stages, "DecodeStage", CrashingDecodeStage)
    killers = [ActorKiller("DecodeStage", delay_s=0.2), ActorKiller("EmbedStage", delay_s=1.0)]
    for k in killers:
        k.start()
    t0 = time.perf_counter()
    try:
        report = run_embed(job, progress=False)
    finally:
        mp.undo()
        for k in killers:
            k.stop.set()
            k.join(5)
    wall = time.perf_counter() - t0
    return {
        "report": report,
        "tables": store_tables(str(out)),
        "good": good,
        "bad": bad,
        "killed": {k.name: k.killed for k in killers},
        "wall": wall,
    }


def test_killed_actors_lose_nothing_and_duplicate_nothing(fault_run) -> None:
    rep, tables = fault_run["report"], fault_run["tables"]
    assert fault_run["killed"]["DecodeStage"] and fault_run["killed"]["EmbedStage"], fault_run["killed"]
    figures = check_store(tables, expect_tracks=fault_run["good"])  # exactly once, all windows
    assert rep.status == "ok" and rep.tracks_ok == len(fault_run["good"])
    long_windows = [t for t in tables["windows"]["track_id"].to_pylist() if t == "long_good"]
    assert len(long_windows) == 20
    assert figures["windows"] == 2 * (len(fault_run["good"]) - 1) + 20
    # restarts are observed and reported: 2 poison crashes + at least the 2 kills
    restarts = rep.extra["actor_restarts"]
    assert restarts["decode"] >= DECODE_MAX_CRASHES + 1 and restarts["model"] >= 1, restarts
    assert "restarts" in rep.summary()


def test_poison_file_becomes_an_error_row_not_a_hang(fault_run) -> None:
    assert DECODE_MAX_CRASHES < ACTOR_MAX_TASK_RETRIES
    errors = {e["track_id"]: e for e in fault_run["tables"]["errors"].to_pylist()}
    e = errors["poison"]
    assert e["stage"] == "decode" and e["error_type"] == "WorkerCrashed"
    assert f"died {DECODE_MAX_CRASHES} times" in e["message"]


def test_hostile_rows_are_error_rows_never_read(fault_run) -> None:
    errors = fault_run["tables"]["errors"].to_pylist()
    by_id: dict[str, list[dict]] = {}
    for e in errors:
        by_id.setdefault(e["track_id"], []).append(e)
    for tid, (stage, etype) in fault_run["bad"].items():
        got = by_id.get(tid)
        assert got, f"no error row for {tid}"
        if tid == "t00001":  # the duplicate: the first row landed, the later one is the error
            assert len(got) == 1 and "first used at row" in got[0]["message"]
            assert got[0]["uri"].endswith("t00002.wav")
        assert (got[0]["stage"], got[0]["error_type"]) == (stage, etype), (tid, got[0])
        assert "\n" not in got[0]["message"] and len(got[0]["message"]) <= 2000
    msgs = {k: by_id[k][0]["message"] for k in fault_run["bad"]}
    assert msgs["symlink"].startswith("symlink escape")
    assert msgs["dotdot"].startswith("path traversal") and msgs["dotdot_mid"].startswith("path traversal")
    assert "scheme 'http' is not allowed" in msgs["http"]
    # rows without a usable id still get an error row (track id None); the NUL id is refused
    untracked = [e for e in errors if e["track_id"] is None]
    texts = " | ".join(e["message"] for e in untracked)
    assert "control characters" in texts and "unparsable CSV row" in texts, texts
    # nothing outside the root was read: the only uris in tracks are under the catalog directory
    cat_dir = str(Path(fault_run["tables"]["tracks"]["uri"].to_pylist()[0]).parent)
    assert all(u.startswith(cat_dir + "/") for u in fault_run["tables"]["tracks"]["uri"].to_pylist())
    tracks = {t["track_id"]: t for t in fault_run["tables"]["tracks"].to_pylist()}
    uni = tracks["uni_\u05e9\u05dc\u05d5\u05dd_\U0001f3b8"]
    assert uni["uri"].endswith(UNICODE_NAME) and uni["channels_in"] == 2


def test_input_limits_give_clear_error_rows(fault_run) -> None:
    errors = {e["track_id"]: e["message"] for e in fault_run["tables"]["errors"].to_pylist()}
    assert "over the 1048576-byte limit" in errors["big"]
    assert "exceeds the limit of 30.000 s" in errors["long"]
    assert "6 channels, over the limit of 4" in errors["six"]
    assert "over the limit of 2000" in errors["wide_row"]
    rep = fault_run["report"]
    assert rep.tracks_failed == fault_run["tables"]["errors"].num_rows  # one row per failed track
    assert rep.tracks_ok + rep.tracks_failed == rep.tracks_total


def test_crash_markers_count_deaths_per_track(tmp_path) -> None:
    """The marker logic alone (no Ray): a death leaves the marker, the next attempt counts it, after
    DECODE_MAX_CRASHES the track is an error row; a normal attempt removes its marker."""
    from pipeline.engine.inference import EmbedSettings

    sf.write(tmp_path / "a.wav", tone(2.0), 24000)
    row = {"track_id": "a", "uri": str(tmp_path / "a.wav"), "metadata_json": "{}"}
    stage = pipeline.flow.stages.DecodeStage(
        EmbedSettings(layers=(1,), window_s=1.0, hop_s=1.0),
        AudioLimits(),
        None,
        attempts_dir=str(tmp_path / "attempts"),
        max_crashes=DECODE_MAX_CRASHES,
    )
    marker = Path(stage._marker(row))
    marker.write_text("1")  # one earlier attempt died
    assert [r["kind"] for r in stage._guarded(row)] == ["window", "window"] and not marker.exists()
    marker.write_text(str(DECODE_MAX_CRASHES))
    rows = stage._guarded(row)
    assert [(r["kind"], r["error_type"]) for r in rows] == [("error", "WorkerCrashed")]
    other = {**row, "track_id": "b"}  # same uri, other track: its own count
    assert stage._marker(other) != str(marker)
    unguarded = pipeline.flow.stages.DecodeStage(
        EmbedSettings(layers=(1,), window_s=1.0, hop_s=1.0), AudioLimits(), None
    )
    assert unguarded._marker(row) is None and len(unguarded._guarded(row)) == 2
