"""End to end: the embed job on real Ray (declared GPU -> actor pool path), real Lance, real audio."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from musicfm import MusicFM25Hz
from pipeline import schemas
from pipeline.io.audio import AudioLimits, decode_audio
from pipeline.io.windows import WindowSpec, plan_windows
from pipeline.runs.embed import run_embed
from pipeline.runs.report import RunReport, finish_report
from pipeline.runs.settings import EmbedJob
from tests.conftest import AUDIO
from tools.testkit.reliability import CKPT, LAYERS, STATS, job_kwargs


def _job(catalog: str, output: str, **kw) -> EmbedJob:
    return EmbedJob(
        catalog=catalog,
        output=output,
        **job_kwargs(**{"window_s": 10.0, "hop_s": 10.0, "batch_size": 4, **kw}),
    )


@pytest.fixture(scope="module")
def clips_store(ray_cluster, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("clips") / "store"
    report = run_embed(_job(str(AUDIO / "catalog.csv"), str(out), frames_hz=5.0), progress=False)
    return out, report


def test_every_clip_lands_with_its_metadata(clips_store) -> None:
    out, report = clips_store
    assert report.status == "ok" and report.tracks_ok == 12 and report.tracks_failed == 0
    tracks = lance.dataset(str(out / "tracks.lance")).to_table()
    with open(AUDIO / "catalog.csv") as f:
        cat = {r["track_id"]: r for r in csv.DictReader(f)}
    assert sorted(tracks["track_id"].to_pylist()) == sorted(cat)
    for row in tracks.to_pylist():
        src = cat[row["track_id"]]
        assert row["title"] == src["title"] and row["artist"] == src["artist"]
        assert row["catalog_duration_s"] == src["duration_s"]  # reserved name renamed, not dropped
        assert abs(row["duration_s"] - float(src["duration_s"])) < 1e-3
        assert row["sample_rate_in"] == int(src["sample_rate"]) and row["channels_in"] == int(src["channels"])
        assert row["num_windows"] == len(
            plan_windows(round(row["duration_s"] * 24000), WindowSpec(10.0, 10.0))
        )
        assert os.path.realpath(row["uri"]) == os.path.realpath(AUDIO / src["uri"])
        assert row["model_id"] == report.model_id and row["run_id"] == report.run_id
        assert row["content_version"]
    assert report.audio_s == pytest.approx(sum(float(r["duration_s"]) for r in cat.values()), abs=0.05)


def test_schemas_of_every_table(clips_store) -> None:
    out, report = clips_store
    dim = 48
    meta = [
        "title",
        "artist",
        "package",
        "license",
        "catalog_duration_s",
        "format",
        "sample_rate",
        "channels",
    ]
    expected = {
        "tracks": schemas.tracks_schema(LAYERS, dim, meta),
        "windows": schemas.windows_schema(LAYERS, dim),
        "frames": schemas.frames_schema(LAYERS, dim),
        "errors": schemas.ERRORS_SCHEMA,
        "runs": schemas.RUNS_SCHEMA,
    }
    for table, schema in expected.items():
        got = lance.dataset(str(out / f"{table}.lance")).schema
        assert got.remove_metadata().equals(schema, check_metadata=False), f"{table}: {got} != {schema}"
    run = lance.dataset(str(out / "runs.lance")).to_table().to_pylist()[-1]
    assert run["run_id"] == report.run_id and run["status"] == "ok" and run["tracks_ok"] == 12
    assert run["x_realtime"] > 0 and run["audio_hours"] > 0
    assert {"decode+model", "commit", "catalog"} <= set(json.loads(run["stage_times_json"]))
    versions = json.loads(run["report_json"])["versions"]
    assert versions["tracks"] == lance.dataset(str(out / "tracks.lance")).version


def _reference(model: MusicFM25Hz, path: Path, spec: WindowSpec):
    samples = decode_audio(str(path)).samples
    wins = plan_windows(samples.shape[0], spec)
    means, tokens = [], []
    with torch.inference_mode():
        for w in wins:
            hs = model.hidden_states(torch.from_numpy(samples[w.start : w.end])[None], list(LAYERS))
            means.append([h[0].mean(0).double().numpy() for h in hs])
            tokens.append(hs[0].shape[1])
    t = np.asarray(tokens, np.float64)
    track = [sum(t[k] * means[k][i] for k in range(len(wins))) / t.sum() for i in range(len(LAYERS))]
    return wins, means, track


def test_stored_vectors_equal_direct_model_run(clips_store) -> None:
    out, _ = clips_store
    model = MusicFM25Hz.from_checkpoint(CKPT, STATS)
    spec = WindowSpec(10.0, 10.0)
    tracks = {r["track_id"]: r for r in lance.dataset(str(out / "tracks.lance")).to_table().to_pylist()}
    windows = lance.dataset(str(out / "windows.lance")).to_table().to_pylist()
    for tid in ("hw_city", "fb_mainzik_1p", "lc_lincity"):  # ogg, opus, wav: 3 decoders
        wins, means, track = _reference(model, Path(tracks[tid]["uri"]), spec)
        got = sorted((w for w in windows if w["track_id"] == tid), key=lambda w: w["window_ix"])
        assert [(g["window_ix"], g["start_s"], g["end_s"]) for g in got] == [
            (w.ix, w.start / 24000, w.end / 24000) for w in wins
        ]
        for g, m in zip(got, means, strict=True):
            for i, lay in enumerate(LAYERS):
                np.testing.assert_allclose(g[f"layer_{lay}"], m[i], rtol=0, atol=1e-5)
        for i, lay in enumerate(LAYERS):
            np.testing.assert_allclose(tracks[tid][f"layer_{lay}"], track[i], rtol=0, atol=1e-5)


def test_tail_window_is_end_aligned_and_frames_do_not_overlap(clips_store) -> None:
    out, _ = clips_store
    win = [
        w
        for w in lance.dataset(str(out / "windows.lance")).to_table().to_pylist()
        if w["track_id"] == "hw_earthrise"
    ]
    spans = sorted((w["start_s"], w["end_s"]) for w in win)
    assert spans == [(0.0, 10.0), (10.0, 20.0), (15.0, 25.0)]  # 25 s track: tail aligned to the end
    frames = lance.dataset(str(out / "frames.lance")).to_table().to_pylist()
    fr = sorted(f["frame_ix"] for f in frames if f["track_id"] == "hw_earthrise")
    assert fr == list(range(125))  # 25 s at 5 Hz, each frame exactly once


# --------------------------------------------------------------------------- bad input


def _write_bad_catalog(d: Path) -> tuple[Path, set[str], set[str]]:
    """A catalog mixing good files (several formats) with every kind of broken one."""
    rng = np.random.default_rng(0)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(24000 * 3) / 24000)).astype(np.float32)
    good = {}
    for name, fmt in (("good_wav.wav", "WAV"), ("good_flac.flac", "FLAC"), ("good_ogg.ogg", "OGG")):
        sf.write(d / name, np.stack([tone, tone * 0.5], 1), 44100 if fmt != "WAV" else 24000, format=fmt)
        good[name.split(".")[0]] = name
    shutil.copy(AUDIO / "clips" / "hw_snow.mp3", d / "good_mp3.mp3")
    good["good_mp3"] = "good_mp3.mp3"
    bad = {}
    (d / "zero.wav").write_bytes(b"")
    bad["zero"] = "zero.wav"
    full = (d / "good_flac.flac").read_bytes()
    (d / "trunc.flac").write_bytes(full[: len(full) // 3][:200])
    bad["trunc"] = "trunc.flac"
    (d / "notaudio.ogg").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    bad["notaudio"] = "notaudio.ogg"
    nan = tone.copy()
    nan[100:200] = np.nan
    sf.write(d / "nan.wav", nan, 24000, subtype="FLOAT")
    bad["nan"] = "nan.wav"
    sf.write(d / "manych.wav", np.zeros((24000, 40), np.float32), 24000, subtype="FLOAT")
    bad["manych"] = "manych.wav"
    sf.write(d / "tiny.wav", tone[:500], 24000)
    bad["tiny"] = "tiny.wav"
    sf.write(d / "long.wav", np.zeros(24000 * 20, np.float32), 8000)  # 60 s > --max-duration-s 40
    bad["long"] = "long.wav"
    (d / "adir.wav").mkdir()
    bad["adir"] = "adir.wav"
    bad["missing"] = "missing.flac"
    bad["etc"] = "file:///etc/passwd"
    bad["http"] = "http://example.com/a.mp3"
    bad["escape"] = "../outside.wav"
    # a WAV whose header claims far more data than it holds: embedded with a warning
    sf.write(d / "liar.wav", tone, 24000, subtype="PCM_16")
    raw = bytearray((d / "liar.wav").read_bytes())
    pos = raw.find(b"data")
    raw[pos + 4 : pos + 8] = struct.pack("<I", 0x7FFFFFF0)
    (d / "liar.wav").write_bytes(bytes(raw))
    good["liar"] = "liar.wav"
    rows = [{"track_id": k, "uri": v, "title": k} for k, v in {**good, **bad}.items()]
    with open(d / "catalog.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["track_id", "uri", "title"])
        w.writeheader()
        w.writerows(rows)
    return d / "catalog.csv", set(good), set(bad)


def test_bad_files_become_error_rows_and_good_ones_land(ray_cluster, tmp_path) -> None:
    cat_dir = tmp_path / "cat"
    cat_dir.mkdir()
    catalog, good, bad = _write_bad_catalog(cat_dir)
    out = tmp_path / "store"
    # more bad files than good ones on purpose: the error budget is opened to see every error row
    job = _job(
        str(catalog), str(out), limits=AudioLimits(max_duration_s=40.0, max_channels=16), max_error_rate=1.0
    )
    report = run_embed(job, progress=False)
    tracks = lance.dataset(str(out / "tracks.lance")).to_table().to_pylist()
    assert {t["track_id"] for t in tracks} == good
    errors = lance.dataset(str(out / "errors.lance")).to_table().to_pylist()
    by_id = {e["track_id"]: e for e in errors}
    assert set(by_id) == bad
    assert all(
        e["message"] and e["stage"] and e["error_type"] and e["run_id"] == report.run_id for e in errors
    )
    assert by_id["etc"]["stage"] == "catalog" and by_id["http"]["stage"] == "catalog"
    assert by_id["escape"]["stage"] == "catalog"
    assert by_id["missing"]["stage"] == "fetch" and by_id["adir"]["stage"] == "fetch"
    for k in ("zero", "trunc", "notaudio", "nan", "manych", "long", "tiny"):
        assert by_id[k]["stage"] == "decode", (k, by_id[k])
    assert "NaN" in by_id["nan"]["message"] or "nan" in by_id["nan"]["message"].lower()
    liar = next(t for t in tracks if t["track_id"] == "liar")
    assert liar["warnings"] and "header" in liar["warnings"]
    assert report.tracks_ok == len(good) and report.tracks_failed == len(bad)
    assert report.status == "ok"  # --max-error-rate 1.0, and some tracks are good
    strict = RunReport(run_id="r", status="running", tracks_total=report.tracks_total)
    finish_report(strict, errors, max_error_rate=0.1)
    assert strict.status == "failed" and "error rate" in strict.extra["reason"]
    assert strict.errors_by_type == report.errors_by_type


def test_parquet_format_writes_the_same_tables(ray_cluster, tmp_path) -> None:
    import pyarrow.dataset as pds

    d = tmp_path / "audio"
    d.mkdir()
    for k in range(3):
        sf.write(
            d / f"t{k}.flac",
            (0.1 * np.random.default_rng(k).standard_normal(24000 * 2)).astype(np.float32),
            24000,
        )
    out = tmp_path / "pq"
    report = run_embed(_job(str(d), str(out), format="parquet"), progress=False)
    assert report.tracks_ok == 3
    tracks = pds.dataset(str(out / "tracks.parquet"), format="parquet").to_table()
    from pipeline.io.uris import stable_track_id

    expected_ids = {stable_track_id(str((d / f"t{k}.flac").resolve())) for k in range(3)}
    assert tracks.num_rows == 3 and set(tracks["track_id"].to_pylist()) == expected_ids
    assert tracks.schema.field("layer_3").type == pa.list_(pa.float32(), 48)
    assert pds.dataset(str(out / "windows.parquet"), format="parquet").count_rows() == 3
