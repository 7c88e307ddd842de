"""Features for evaluation, made by the pipeline itself and read back per layer.

:func:`embed_features` runs the embed job (:func:`pipeline.runs.embed.run_embed`, the same
distributed Ray job as for a catalog) on the dataset's audio with the task's profile: windows of
the task's length, frames at the task's rate for frame-level tasks (``frames.lance``), one
vector per track for track-level ones (``tracks.lance``). Into a store that already holds the
tracks with these settings the embed writes nothing (the refresh engine skips them).
:func:`store_settings` checks that a given store holds the task's profile before it is reused
as it is; :func:`read_features` reads the vectors of all requested layers in one pass.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate.datasets import EvalDataset
from pipeline.evaluate.tasks import Task
from pipeline.insights.vectors import check_layers, id_filter, to_matrix
from pipeline.schemas import layer_column
from pipeline.store.tables import Store, sql_str


@dataclass(frozen=True)
class FeatureSpec:
    """How features are made: the model and the embed job's execution settings."""

    store: str
    checkpoint: str | None = None  # None: use the store as it is
    stats: str | None = None
    model_config: str | None = None
    layers: tuple[int, ...] = tuple(range(13))
    precision: str = "auto"
    batch_size: int | None = None
    decode_cpus: int | None = 2
    gpu_actors: int | None = None
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers or any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct and >= 0, got {self.layers}")


@dataclass
class Features:
    """Vectors of the dataset's tracks, all requested layers.

    ``tracks``: track-level tasks, {track_id: (L, D)}; ``frames``: frame-level tasks,
    {track_id: (times (T,), vectors (T, L, D))}; ``errors``: {track_id: reason} for tracks the
    embed could not read (they are left out of the evaluation and reported)."""

    model_id: str
    settings_id: str
    layers: tuple[int, ...]
    tracks: dict[str, np.ndarray] = field(default_factory=dict)
    frames: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    embed_report: dict = field(default_factory=dict)


def write_catalog(ds: EvalDataset, path: str) -> str:
    """The dataset's audio as an embed catalog (``track_id``, absolute ``uri``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["track_id", "uri"])
        for t in ds.tracks:
            w.writerow([t.track_id, t.audio])
    return path


def embed_features(
    ds: EvalDataset, task: Task, spec: FeatureSpec, work_dir: str, progress: bool = False
) -> dict:
    """Run the embed job for the dataset with the task's profile into ``spec.store``; returns
    the run's summary figures. Raises what :func:`run_embed` raises when the run fails."""
    from pipeline.io.audio import AudioLimits
    from pipeline.runs.embed import run_embed
    from pipeline.runs.settings import EmbedJob

    prof = task.profile
    job = EmbedJob(
        catalog=write_catalog(ds, os.path.join(work_dir, "catalog.csv")),
        output=spec.store,
        checkpoint=spec.checkpoint or EmbedJob.checkpoint,
        stats=spec.stats,
        model_config=spec.model_config,
        layers=tuple(spec.layers),
        window_s=prof.window_s,
        hop_s=prof.window_s,
        frames_hz=task.frames_hz,
        precision=spec.precision,
        batch_size=spec.batch_size,
        decode_cpus=spec.decode_cpus,
        gpu_actors=spec.gpu_actors,
        storage_options=dict(spec.storage_options),
        allowed_prefixes=(ds.root,),
        limits=AudioLimits(),
    )
    report = run_embed(job, progress=progress)
    return {"run_id": report.run_id, "status": report.status, "tracks_embedded": report.tracks_ok,
            "already_stored": report.already_stored, "failed": report.tracks_failed, "wall_s": report.wall_s,
            "model_id": report.model_id, "settings_id": report.settings_id}  # fmt: skip


def store_settings(store: str, settings_id: str, storage_options: dict | None = None) -> dict:
    """The embed arguments (window_s, frames_hz, layers, ...) of the run that wrote
    ``settings_id`` into ``store``, from its ``runs.lance``."""
    runs = Store(store, storage_options, create=False).open("runs")
    if runs is None:
        raise ValueError(f"the store at {store} has no runs.lance: cannot tell its window settings")
    where = f"settings_id = {sql_str(settings_id)} AND kind IN ('embed', 'refresh')"
    rows = runs.to_table(columns=["settings_id", "args_json"], filter=where).to_pylist()
    if not rows:
        raise ValueError(f"no run in {store}/runs.lance wrote settings {settings_id}")
    return json.loads(rows[-1]["args_json"] or "{}")


def check_profile(store: str, settings_id: str, task: Task, storage_options: dict | None = None) -> None:
    """Refuse a store whose windows / frame rate are not the task's profile."""
    args = store_settings(store, settings_id, storage_options)
    win, hz = args.get("window_s"), args.get("frames_hz")
    if win is None or abs(float(win) - task.profile.window_s) > 1e-6:
        raise ValueError(f"the store's windows are {win} s; task {task.name} needs {task.profile.window_s} s")
    if task.level == "frame" and (hz is None or abs(float(hz) - float(task.frames_hz or 0)) > 1e-6):
        raise ValueError(f"the store's frames are at {hz} Hz; task {task.name} needs {task.frames_hz} Hz")


def read_features(
    store: str, task: Task, layers: tuple[int, ...], track_ids: list[str], storage_options: dict | None = None
) -> Features:
    """All ``layers`` of ``track_ids`` from the store in one read (``tracks`` or ``frames``)."""
    st = Store(store, storage_options, create=False)
    tracks = st.open("tracks")
    if tracks is None:
        raise ValueError(f"no tracks.lance in the store at {store}")
    check_layers(tracks, layers)
    cols = [layer_column(i) for i in layers]
    meta = tracks.to_table(columns=["track_id", "model_id", "settings_id", "duration_s", *(cols if task.level == "track" else [])],
                           filter=id_filter("track_id", track_ids))  # fmt: skip
    if meta.num_rows == 0:
        raise ValueError(f"the store at {store} holds none of the dataset's {len(track_ids)} tracks")
    settings = sorted(set(meta["settings_id"].to_pylist()))
    if len(settings) > 1:
        raise ValueError(
            f"the store holds the dataset's tracks with {len(settings)} different settings; re-embed"
        )
    out = Features(str(meta["model_id"][0]), settings[0], tuple(layers))
    ids = meta["track_id"].to_pylist()
    out.durations = dict(zip(ids, (float(d or 0.0) for d in meta["duration_s"].to_pylist()), strict=True))
    if task.level == "track":
        mats = np.stack([to_matrix(meta[c]) for c in cols], axis=1)  # (N, L, D)
        out.tracks = {t: mats[i] for i, t in enumerate(ids)}
    else:
        out.frames = read_frames(st, cols, ids)
    found = set(ids)
    out.errors = error_messages(st, [t for t in track_ids if t not in found])
    return out


def read_frames(st: Store, cols: list[str], ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{track_id: (frame centre times (T,), vectors (T, L, D))}, frames in time order."""
    frames = st.open("frames")
    if frames is None:
        raise ValueError(
            f"no frames.lance beside the tracks ({st.uri('frames')}): embed with the task's frame rate"
        )
    tbl = frames.to_table(
        columns=["track_id", "frame_ix", "time_s", *cols], filter=id_filter("track_id", ids)
    )
    tid = np.asarray(tbl["track_id"].to_pylist(), dtype=object)
    fix = tbl["frame_ix"].to_numpy()
    times = tbl["time_s"].to_numpy()
    mats = np.stack([to_matrix(tbl[c]) for c in cols], axis=1)  # (N, L, D)
    out = {}
    for t in ids:
        rows = np.flatnonzero(tid == t)
        rows = rows[np.argsort(fix[rows], kind="stable")]
        out[t] = (times[rows], mats[rows])
    return out


def error_messages(st: Store, missing: list[str]) -> dict[str, str]:
    """The latest error row's reason for each track missing from the store."""
    if not missing:
        return {}
    out = {t: "not in the store" for t in missing}
    errs = st.open("errors")
    if errs is None:
        return out
    for r in errs.to_table(
        columns=["track_id", "stage", "message"], filter=id_filter("track_id", missing)
    ).to_pylist():
        out[r["track_id"]] = f"{r['stage']}: {r['message']}"
    return out
