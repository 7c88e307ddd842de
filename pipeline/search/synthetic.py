"""Small synthetic embedding stores with the real schemas, for tests, demos and benchmarks.

:func:`write_synthetic_store` writes ``tracks.lance`` (+ ``windows.lance`` and ``runs.lance``)
whose vectors are clustered random unit vectors, so that nearest-neighbour structure exists
(tracks of one cluster are close) and ANN recall can be measured against brute force.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.schemas import RUNS_SCHEMA, layer_column, tracks_schema, windows_schema
from pipeline.store.tables import Store

__all__ = ["SyntheticStore", "clustered_vectors", "tracks_table", "write_synthetic_store"]

GENRES = ("rock", "jazz", "pop", "folk", "metal", "ambient")


def clustered_vectors(n: int, dim: int, clusters: int, spread: float = 1.0, seed: int = 0) -> np.ndarray:
    """``n`` unit float32 vectors drawn around ``clusters`` random unit centres (noise norm ~``spread``)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, clusters), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lab = rng.integers(0, len(centres), n)
    x = centres[lab] + (spread / np.sqrt(dim)) * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _fsl(a: np.ndarray) -> pa.FixedSizeListArray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


@dataclass
class SyntheticStore:
    """What :func:`write_synthetic_store` wrote (the vectors, to compare search results with)."""

    root: str
    track_ids: list[str]
    track_vectors: dict[int, np.ndarray]  # layer -> (n, D)
    window_track_ids: list[str] = field(default_factory=list)
    window_vectors: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (W, D)
    window_times: list[tuple[float, float]] = field(default_factory=list)
    metadata: dict[str, list[str | None]] = field(default_factory=dict)
    model_id: str = "musicfm-synthetic"


def tracks_table(
    track_ids: Sequence[str],
    vectors: Mapping[int, np.ndarray],
    metadata: Mapping[str, Sequence[str | None]],
    model_id: str | Sequence[str] = "musicfm-synthetic",
    run_id: str = "run-synthetic",
    num_windows: int = 1,
) -> pa.Table:
    """A ``tracks`` table in the pipeline's schema."""
    layers = sorted(vectors)
    dim = int(next(iter(vectors.values())).shape[1])
    n = len(track_ids)
    schema = tracks_schema(layers, dim, list(metadata))
    mids = [model_id] * n if isinstance(model_id, str) else list(model_id)
    now = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)
    cols: dict[str, Any] = {
        "track_id": pa.array(list(track_ids), pa.string()),
        "uri": pa.array([f"/music/{t}.flac" for t in track_ids], pa.string()),
        "content_version": pa.array(["v1"] * n, pa.string()),
        "duration_s": pa.array([30.0 * num_windows] * n, pa.float64()),
        "sample_rate_in": pa.array([44100] * n, pa.int32()),
        "channels_in": pa.array([2] * n, pa.int32()),
        "num_windows": pa.array([num_windows] * n, pa.int32()),
        **{m: pa.array(list(v), pa.string()) for m, v in metadata.items()},
        **{layer_column(ix): _fsl(vectors[ix]) for ix in layers},
        "warnings": pa.array([None] * n, pa.string()),
        "model_id": pa.array(mids, pa.string()),
        "settings_id": pa.array(["s-synthetic"] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "embedded_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    }
    return pa.table(cols, schema=schema)


def write_synthetic_store(
    root: str,
    n_tracks: int = 200,
    layers: Sequence[int] = (6, 12),
    dim: int = 32,
    windows_per_track: int = 0,
    clusters: int = 20,
    seed: int = 0,
    model_id: str = "musicfm-synthetic",
    storage_options: Mapping[str, str] | None = None,
    run_args: Mapping[str, Any] | None = None,
) -> SyntheticStore:
    """Write a store of ``n_tracks`` clustered tracks under ``root`` (local dir or ``s3://``).

    Tracks get ``title`` (``"Title {i}"``), ``artist`` (``"Artist {i % 7}"``) and ``genre``
    (cycling through :data:`GENRES`) metadata. With ``windows_per_track > 0`` it also writes
    ``windows.lance`` (30 s windows; each track vector is the mean of its window vectors) and
    ``runs.lance`` (one ``ok`` run whose ``args_json`` is ``run_args``). ``storage_options`` are
    Lance keys (``aws_endpoint``...). ``n_tracks=0`` writes empty tables.
    """
    rng = np.random.default_rng(seed + 1)
    ids = [f"trk{i:05d}" for i in range(n_tracks)]
    meta = {
        "title": [f"Title {i}" for i in range(n_tracks)],
        "artist": [f"Artist {i % 7}" for i in range(n_tracks)],
        "genre": [GENRES[i % len(GENRES)] for i in range(n_tracks)],
    }
    tvecs: dict[int, np.ndarray] = {}
    wvecs: dict[int, np.ndarray] = {}
    w_ids: list[str] = []
    w_times: list[tuple[float, float]] = []
    for j, ix in enumerate(layers):
        base = clustered_vectors(n_tracks, dim, clusters, seed=seed + 17 * j)
        if windows_per_track:
            noise = rng.standard_normal((n_tracks, windows_per_track, dim)).astype(np.float32) * (
                0.6 / np.sqrt(dim)
            )
            win = base[:, None, :] + noise
            win /= np.linalg.norm(win, axis=2, keepdims=True)
            wvecs[ix] = win.reshape(-1, dim)
            tvecs[ix] = win.mean(axis=1).astype(np.float32)
        else:
            tvecs[ix] = base
    if windows_per_track:
        for t in ids:
            for w in range(windows_per_track):
                w_ids.append(t)
                w_times.append((30.0 * w, 30.0 * (w + 1)))
    root = root.rstrip("/")
    store = Store(root, create=False, lance_opts=storage_options)  # Lance's own keys
    if not n_tracks:
        tvecs = {ix: np.zeros((0, dim), np.float32) for ix in layers}
    tbl = tracks_table(ids, tvecs, meta, model_id=model_id, num_windows=max(1, windows_per_track))
    store.write_table("tracks", tbl)
    if windows_per_track or not n_tracks:
        store.write_table("windows", _windows_table(w_ids, w_times, wvecs, layers, dim, windows_per_track))
    store.write_table("runs", _runs_table(model_id, n_tracks, len(w_ids), run_args))
    return SyntheticStore(
        root=root,
        track_ids=ids,
        track_vectors=tvecs,
        window_track_ids=w_ids,
        window_vectors=wvecs,
        window_times=w_times,
        metadata=meta,
        model_id=model_id,
    )


def _windows_table(
    w_ids: Sequence[str],
    w_times: Sequence[tuple[float, float]],
    wvecs: Mapping[int, np.ndarray],
    layers: Sequence[int],
    dim: int,
    windows_per_track: int,
) -> pa.Table:
    """The ``windows`` rows of :func:`write_synthetic_store` (vectors (N, dim) per layer)."""
    nw = len(w_ids)
    return pa.table(
        {
            "track_id": pa.array(w_ids, pa.string()),
            "window_ix": pa.array([i % max(1, windows_per_track) for i in range(nw)], pa.int32()),
            "start_s": pa.array([a for a, _ in w_times], pa.float64()),
            "end_s": pa.array([b for _, b in w_times], pa.float64()),
            **{layer_column(ix): _fsl(wvecs.get(ix, np.zeros((0, dim), np.float32))) for ix in layers},
            "settings_id": pa.array(["s-synthetic"] * nw, pa.string()),
            "run_id": pa.array(["run-synthetic"] * nw, pa.string()),
        },
        schema=windows_schema(list(layers), dim),
    )


def _runs_table(model_id: str, n_tracks: int, n_windows: int, run_args: Mapping[str, Any] | None) -> pa.Table:
    """The one ``ok`` run of :func:`write_synthetic_store`."""
    now = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)
    return pa.table(
        {
            "run_id": ["run-synthetic"],
            "kind": ["embed"],
            "status": ["ok"],
            "started_at": [now],
            "finished_at": [now],
            "args_json": [json.dumps(dict(run_args or {}))],
            "model_id": [model_id],
            "settings_id": ["s-synthetic"],
            "tracks_ok": [n_tracks],
            "tracks_failed": [0],
            "windows": [n_windows],
            "audio_hours": [0.0],
            "wall_s": [0.0],
            "x_realtime": [0.0],
            "stage_times_json": ["{}"],
            "report_json": ["{}"],
        },
        schema=RUNS_SCHEMA,
    )
