"""Write a probe's predictions into ``tracks`` as columns (then search can filter on them).

Columns, for a probe named ``<name>`` (its card's ``name``):

* multiclass: ``tag_<name>`` (string, the most probable class) and ``tag_<name>_score``
  (float, its probability), e.g. ``--where "tag_genre = 'jazz' AND tag_genre_score > 0.8"``;
* multilabel: ``tag_<name>`` (list of strings, labels with probability >= 0.5, most probable
  first) and ``tag_<name>_scores`` (list of floats, one per label in the card's order), e.g.
  ``--where "array_has(tag_mood, 'happy')"``;
* regression: ``tag_<name>`` (float), or ``tag_<name>_<target>`` per target column.

Rows are predicted per fragment group (Ray tasks for large stores) and written with one Lance
column addition (``merge`` on ``track_id``) or, when the columns exist, one partial
``merge_insert`` (see :func:`pipeline.insights.vectors.write_track_columns`). A probe whose
``model_id`` or ``settings_id`` differs from the store's rows is refused
(:class:`ProbeMismatchError`): vectors of another model or other settings mean nothing to it.
``run_id`` restricts the work to the rows of one run (a refresh's new and changed tracks).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.insights.probes import Probe
from pipeline.insights.vectors import (
    RAY_MIN_ROWS,
    StoreRef,
    check_layers,
    fragment_groups,
    id_filter,
    read_fragments,
    run_tasks,
    store_ref,
    to_matrix,
)
from pipeline.schemas import layer_column
from pipeline.store.tables import sql_str

__all__ = [
    "MULTILABEL_THRESHOLD",
    "PredictReport",
    "ProbeMismatchError",
    "predict_store",
    "predictions_table",
]

MULTILABEL_THRESHOLD = 0.5


class ProbeMismatchError(ValueError):
    """The probe was trained on vectors of another model or other embedding settings."""


@dataclass
class PredictReport:
    probe: str
    columns: list[str]
    rows: int = 0
    ray: bool = False
    version: int | None = None
    wall_s: float = 0.0

    def summary(self) -> str:
        return (
            f"probe {self.probe}: {self.rows} tracks predicted into {', '.join(self.columns)}"
            f"{' (Ray)' if self.ray else ''}, tracks version {self.version}, {self.wall_s:.1f} s"
        )


def column_names(card: Mapping[str, Any]) -> list[str]:
    """The ``tracks`` columns a probe writes."""
    base = f"tag_{card['name']}"
    if card["task"] == "multiclass":
        return [base, f"{base}_score"]
    if card["task"] == "multilabel":
        return [base, f"{base}_scores"]
    cols = card["labels"]
    return [base] if len(cols) == 1 else [f"{base}_{c}" for c in cols]


def predictions_table(probe: Probe, track_ids: Sequence[str], pred: np.ndarray) -> pa.Table:
    """``track_id`` plus the probe's columns for predictions ``pred`` (N, C)."""
    names = column_names(probe.card)
    labels = probe.labels
    cols: dict[str, pa.Array] = {"track_id": pa.array(list(track_ids), pa.string())}
    if probe.task == "multiclass":
        best = pred.argmax(1) if len(pred) else np.zeros(0, np.int64)
        cols[names[0]] = pa.array([labels[i] for i in best], pa.string())
        cols[names[1]] = pa.array(pred[np.arange(len(pred)), best].astype(np.float32), pa.float32())
    elif probe.task == "multilabel":
        tags = []
        for row in pred:
            order = np.argsort(-row, kind="stable")
            tags.append([labels[j] for j in order if row[j] >= MULTILABEL_THRESHOLD])
        cols[names[0]] = pa.array(tags, pa.list_(pa.string()))
        cols[names[1]] = pa.array([r.astype(np.float32) for r in pred], pa.list_(pa.float32()))
    else:
        for j, n in enumerate(names):
            cols[n] = pa.array(pred[:, j].astype(np.float32), pa.float32())
    return pa.table(cols)


def _predict_task(
    fragment_ids: Sequence[int], ref: StoreRef, windows: StoreRef | None, probe: Probe, run_filter: str | None
) -> pa.Table:
    """Predictions for the tracks of some fragments of ``tracks`` (window probes: the mean over
    each track's windows)."""
    layers = probe.layers
    cols = [layer_column(i) for i in layers]
    t = read_fragments(ref, fragment_ids, ["track_id"] + ([] if windows else cols), run_filter)
    ids = t["track_id"].to_pylist()
    if not ids:
        return predictions_table(probe, [], np.zeros((0, len(probe.labels)), np.float32))
    if windows is None:
        x = np.stack([to_matrix(t[c]) for c in cols], axis=1)  # (N, L, D)
        return predictions_table(probe, ids, probe.predict(x))
    w = windows.open().to_table(columns=["track_id", *cols], filter=id_filter("track_id", ids))
    x = np.stack([to_matrix(w[c]) for c in cols], axis=1)  # (W, L, D)
    pw = probe.predict(x)
    pos = {tid: i for i, tid in enumerate(ids)}
    g = np.array([pos[tid] for tid in w["track_id"].to_pylist()], np.int64)
    acc = np.zeros((len(ids), pw.shape[1]), np.float64)
    np.add.at(acc, g, pw)
    cnt = np.bincount(g, minlength=len(ids))
    have = cnt > 0
    pred = (acc[have] / cnt[have, None]).astype(np.float32)
    return predictions_table(probe, [i for i, h in zip(ids, have, strict=True) if h], pred)


def check_probe(probe: Probe, ref: StoreRef, run_filter: str | None = None) -> int:
    """Raise :class:`ProbeMismatchError` unless the rows (of the run) have the probe's model and
    settings; returns the number of rows."""
    ds = ref.open()
    t = ds.to_table(columns=["model_id", "settings_id"], filter=run_filter)
    pairs = set(zip(t["model_id"].to_pylist(), t["settings_id"].to_pylist(), strict=True))
    want = (probe.card["model_id"], probe.card["settings_id"])
    other = sorted(p for p in pairs if p != want)
    if other:
        m, s = other[0]
        raise ProbeMismatchError(
            f"probe {probe.card['name']} was trained on model {want[0]} (settings {want[1]}) but the store "
            f"holds model {m} (settings {s}): train a probe on this store's vectors"
        )
    check_layers(ds, probe.layers)
    return t.num_rows


def predict_store(
    store: str,
    probe_dir: str | Probe,
    storage_options: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    use_ray: bool | None = None,
    ray_min_rows: int = RAY_MIN_ROWS,
) -> PredictReport:
    """Predict every track (or the tracks of ``run_id``) with a probe and write the columns."""
    t0 = time.perf_counter()
    probe = probe_dir if isinstance(probe_dir, Probe) else Probe.load(probe_dir)
    ref = store_ref(store, storage_options)
    run_filter = f"run_id = {sql_str(run_id)}" if run_id else None
    n = check_probe(probe, ref, run_filter)
    windows = store_ref(store, storage_options, "windows") if probe.card.get("level") == "window" else None
    report = PredictReport(probe=probe.card["name"], columns=column_names(probe.card))
    ds = ref.open()
    if use_ray is None:
        use_ray = ds.count_rows() >= ray_min_rows
    n_groups = 1
    if use_ray:
        import ray

        from pipeline.flow.runtime import ensure_ray

        ensure_ray()
        n_groups = max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    report.ray = bool(use_ray)
    if n:
        shared = {"ref": ref, "windows": windows, "probe": probe, "run_filter": run_filter}
        parts = run_tasks(_predict_task, fragment_groups(ds, n_groups), shared, use_ray)
        table = pa.concat_tables(parts) if parts else None
        if table is not None and table.num_rows:
            from pipeline.insights.vectors import write_track_columns

            report.version = write_track_columns(ref, table)
            report.rows = table.num_rows
    report.wall_s = time.perf_counter() - t0
    return report
