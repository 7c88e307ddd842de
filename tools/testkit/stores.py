"""Stores for tests and benchmarks: synthetic tracks, catalogs, job factories with the small
golden model, and the invariants of a store at rest (compared between runs)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import soundfile as sf

from pipeline.runs.settings import EmbedJob, RefreshJob
from pipeline.store.tables import Store
from tools.testkit.paths import require_shared

GOLDEN = require_shared() / "golden"
CKPT, STATS = str(GOLDEN / "checkpoint.pt"), str(GOLDEN / "stats.json")
LAYERS = (1, 3)
DATA_TABLES = ("tracks", "windows", "frames")


def write_tone(path: Path, seconds: float, freq: float, sr: int = 16000) -> str:
    """A short synthetic track (format from the extension: wav, flac, ogg)."""
    t = np.arange(int(sr * seconds)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.sin(2 * np.pi * 3.1 * freq * t)).astype(np.float32)
    sf.write(str(path), x, sr)
    return str(path)


def write_catalog(path: Path, rows: list[tuple[str, str, str]]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["track_id", "uri", "title"])
        w.writerows(rows)
    return str(path)


def embed_job(catalog: str, store: str, **kw: Any) -> EmbedJob:
    base = dict(catalog=catalog, output=store, checkpoint=CKPT, stats=STATS, layers=LAYERS, precision="fp32",
                window_s=1.0, hop_s=1.0, frames_hz=5.0, batch_size=8, decode_cpus=1, gpu_actors=1)  # fmt: skip
    base.update(kw)
    return EmbedJob(**base)


def refresh_job(catalog: str, store: str, chunk_size: int = 10, **kw: Any) -> RefreshJob:
    embed_kw = {k: kw.pop(k) for k in list(kw) if k in EmbedJob.__dataclass_fields__}
    return RefreshJob(embed=embed_job(catalog, store, **embed_kw), chunk_size=chunk_size, **kw)


def versions(
    store: str | Path, tables: tuple[str, ...] = DATA_TABLES, so: dict | None = None
) -> dict[str, int]:
    s = Store(str(store), so)
    return {t: ds.version for t in tables if (ds := s.open(t)) is not None}


def table(store: str | Path, name: str, so: dict | None = None) -> pa.Table:
    ds = Store(str(store), so).open(name)
    assert ds is not None, f"{name}.lance missing in {store}"
    return ds.to_table()


def check_consistent(store: str | Path, so: dict | None = None) -> dict[str, dict]:
    """Invariants of a store at rest: unique track ids; each track's windows (and frames) present
    exactly once, all of its current run; no orphan rows. Returns the rows keyed for comparison."""
    tracks = table(store, "tracks", so).to_pylist()
    ids = [t["track_id"] for t in tracks]
    assert len(ids) == len(set(ids)), "duplicate track rows"
    current = {t["track_id"]: t["run_id"] for t in tracks}
    out: dict[str, dict] = {"tracks": {t["track_id"]: t for t in tracks}}
    for name, ix in (("windows", "window_ix"), ("frames", "frame_ix")):
        rows = table(store, name, so).to_pylist()
        keyed: dict[tuple, dict] = {}
        for r in rows:
            assert current.get(r["track_id"]) == r["run_id"], (
                f"orphan {name} row {r['track_id']} {r['run_id']}"
            )
            key = (r["track_id"], r[ix])
            assert key not in keyed, f"duplicate {name} row {key}"
            keyed[key] = r
        out[name] = keyed
    for t in tracks:  # every track has all its windows
        have = sorted(k[1] for k in out["windows"] if k[0] == t["track_id"])
        assert have == list(range(t["num_windows"])), (t["track_id"], have)
        assert any(k[0] == t["track_id"] for k in out["frames"])
    return out


def assert_same_store(got: str | Path, want: str | Path, so: dict | None = None) -> None:
    """``got`` holds the same tracks, vectors, windows and frames as ``want`` (run ids aside)."""
    a, b = check_consistent(got, so), check_consistent(want, so)
    assert sorted(a["tracks"]) == sorted(b["tracks"])
    for tid, ta in a["tracks"].items():
        tb = b["tracks"][tid]
        for col in ("uri", "content_version", "settings_id", "title", "num_windows", "model_id"):
            assert ta[col] == tb[col], (tid, col, ta[col], tb[col])
        for lay in LAYERS:
            np.testing.assert_allclose(ta[f"layer_{lay}"], tb[f"layer_{lay}"], atol=1e-5)
    for name in ("windows", "frames"):
        assert sorted(a[name]) == sorted(b[name]), name
        for key, ra in a[name].items():
            np.testing.assert_allclose(ra["layer_3"], b[name][key]["layer_3"], atol=1e-5)


def run_row(store: str | Path, run_id: str) -> dict:
    rows = [r for r in table(store, "runs").to_pylist() if r["run_id"] == run_id]
    assert len(rows) == 1
    return rows[0]


def synthetic_tracks(store: str, ids: list[str], uris: list[str], versions: list[str | None], model: tuple,
                     so: dict | None = None, batch: int = 1_000_000) -> None:  # fmt: skip
    """A ``tracks.lance`` of these tracks (random vectors, one window each) written through the
    project's writer, as an embed with ``model = (model_id, settings_id, layers, dim)`` would
    leave it (no windows/frames: for plans, not for reading vectors back)."""
    import lance

    from pipeline import schemas

    model_id, settings_id, layers, dim = model
    writer = Store(store, so)
    schema = schemas.tracks_schema(list(layers), dim, [])
    rng = np.random.default_rng(0)
    now, frags = schemas.utc_now(), []
    for a in range(0, len(ids), batch):
        b = min(len(ids), a + batch)
        m = b - a
        cols = {
            "track_id": pa.array(ids[a:b]), "uri": pa.array(uris[a:b]), "content_version": pa.array(versions[a:b], pa.string()),
            "duration_s": pa.array(np.full(m, 30.0)), "sample_rate_in": pa.array(np.full(m, 44100, np.int32)),
            "channels_in": pa.array(np.full(m, 2, np.int32)), "num_windows": pa.array(np.full(m, 1, np.int32)),
            **{schemas.layer_column(ix): pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(m * dim).astype(np.float32)), dim) for ix in layers},
            "warnings": pa.nulls(m, pa.string()), "model_id": pa.array([model_id] * m),
            "settings_id": pa.array([settings_id] * m), "run_id": pa.array(["run-synthetic"] * m),
            "embedded_at": pa.array([now] * m, pa.timestamp("us", tz="UTC")),
        }  # fmt: skip
        frags += lance.fragment.write_fragments(pa.table(cols, schema=schema), writer.uri("tracks"), schema=schema,
                                                storage_options=writer.lance_options)  # fmt: skip
    writer.commit("tracks", schema, frags, "overwrite")


def model_settings(job: EmbedJob) -> tuple[str, str, tuple[int, ...], int]:
    """model_id, settings_id, layers and vector size of a job's model and settings."""
    from pipeline.runs.model_info import model_info_for_plan

    info = model_info_for_plan(job)
    return info.model_id, info.settings_id, tuple(info.settings.layers), int(info.dim)


def orphan_store(root: Path) -> Path:
    """Key columns of a store of 50 tracks (run r1) whose windows/frames hold 4 rows no track
    points at (superseded runs r0 of t03 and t07, an orphan run r9) and lack t09's rows."""
    import lance

    ids = [f"t{i:02d}" for i in range(50)]
    lance.write_dataset(pa.table({"track_id": ids, "run_id": ["r1"] * 50}), str(root / "tracks.lance"))
    win = [(t, "r1", w) for t in ids if t != "t09" for w in range(2)]  # t09 lost its windows
    win += [("t03", "r0", 0), ("t07", "r0", 0), ("t07", "r0", 1), ("gone", "r9", 0)]  # superseded, orphan
    for name, col in (("windows", "window_ix"), ("frames", "frame_ix")):
        t, r, w = zip(*win, strict=True)
        lance.write_dataset(pa.table({"track_id": t, "run_id": r, col: w}), str(root / f"{name}.lance"))
    return root
