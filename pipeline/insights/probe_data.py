"""The rows a probe learns from: a labels file (CSV / TSV / Parquet / JSON lines with
``track_id`` and label column(s)) read into targets per task (:func:`load_labels`), and the
stored layer vectors of the labelled tracks, at track or window level (:func:`read_features`).

Tasks: ``multiclass`` (one label column, any values), ``multilabel`` (one column of lists, or of
strings joined with ``|``, ``;`` or ``,``; or several 0/1 columns, one per label), ``regression``
(one or more numeric columns). Rows without a label are dropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.insights.vectors import check_layers, id_filter, store_ref, to_matrix
from pipeline.schemas import layer_column

__all__ = ["Features", "LabelError", "Labels", "load_labels", "read_features"]

_SPLIT_CHARS = re.compile(r"\s*[|;,]\s*")


class LabelError(ValueError):
    """A labels file that cannot be used (missing columns, no labelled track in the store...)."""


# --------------------------------------------------------------------------- labels


def _read_table(path: str) -> pa.Table:
    ext = os.path.splitext(path.lower())[1]
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if ext in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pj

            return pj.read_json(path)
        if ext in (".csv", ".tsv"):
            import pyarrow.csv as pcsv

            opts = pcsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ",")
            return pcsv.read_csv(
                path, parse_options=opts, convert_options=pcsv.ConvertOptions(strings_can_be_null=True)
            )
    except (OSError, pa.ArrowInvalid) as e:
        raise LabelError(f"cannot read labels {path}: {' '.join(str(e).split())}") from None
    raise LabelError(f"labels file {path}: expected .csv, .tsv, .parquet or .jsonl")


@dataclass
class Labels:
    """Targets per track: ``y`` is (N,) class index, (N, C) 0/1 or (N, C) float."""

    track_ids: list[str]
    y: np.ndarray
    labels: list[str]  # class names / label names / target column names
    columns: list[str]


def load_labels(path: str, task: str, columns: Sequence[str] | None = None) -> Labels:
    """Read and check a labels file for ``task`` (rows without a label are dropped)."""
    t = _read_table(path)
    if "track_id" not in t.column_names:
        raise LabelError(f"labels file {path} has no track_id column (columns: {', '.join(t.column_names)})")
    cols = list(columns) if columns else [c for c in t.column_names if c != "track_id"]
    missing = [c for c in cols if c not in t.column_names]
    if missing or not cols:
        raise LabelError(
            f"labels file {path}: no label column {missing or ''} (columns: {', '.join(t.column_names)})"
        )
    ids = [str(x) if x is not None else None for x in t["track_id"].to_pylist()]
    if task == "multiclass":
        if len(cols) != 1:
            raise LabelError(f"multiclass takes one label column, got {cols}; pick one with --label-column")
        vals = t[cols[0]].to_pylist()
        keep = [
            i
            for i, (tid, v) in enumerate(zip(ids, vals, strict=True))
            if tid is not None and v not in (None, "")
        ]
        names = sorted({str(vals[i]) for i in keep})
        if len(names) < 2:
            raise LabelError(f"multiclass needs at least 2 classes in {cols[0]}, got {names}")
        index = {n: i for i, n in enumerate(names)}
        return Labels(
            [ids[i] for i in keep], np.array([index[str(vals[i])] for i in keep], np.int64), names, cols
        )
    if task == "multilabel":
        if len(cols) == 1:
            vals = t[cols[0]].to_pylist()
            sets = []
            for v in vals:
                if v is None:
                    sets.append(None)
                elif isinstance(v, list):
                    sets.append({str(x) for x in v if x not in (None, "")})
                else:
                    sets.append({x for x in _SPLIT_CHARS.split(str(v).strip()) if x})
            keep = [i for i, s in enumerate(sets) if ids[i] is not None and s is not None]
            names = sorted(set().union(*(sets[i] for i in keep))) if keep else []
            y = np.array([[n in sets[i] for n in names] for i in keep], np.float32).reshape(
                len(keep), len(names)
            )
        else:
            mat = np.stack(
                [np.asarray(t[c].to_numpy(zero_copy_only=False), dtype=np.float64) for c in cols], 1
            )
            keep = [i for i in range(len(ids)) if ids[i] is not None and np.all(np.isfinite(mat[i]))]
            names = list(cols)
            y = (mat[keep] > 0.5).astype(np.float32)
        if len(names) < 1:
            raise LabelError("multilabel needs at least one label")
        return Labels([ids[i] for i in keep], y, names, cols)
    mat = []
    for c in cols:
        if not (pa.types.is_integer(t[c].type) or pa.types.is_floating(t[c].type)):
            raise LabelError(f"regression target {c} is not numeric ({t[c].type})")
        mat.append(np.asarray(t[c].to_numpy(zero_copy_only=False), dtype=np.float64))
    m = np.stack(mat, 1)
    keep = [i for i in range(len(ids)) if ids[i] is not None and np.all(np.isfinite(m[i]))]
    return Labels([ids[i] for i in keep], m[keep].astype(np.float32), list(cols), cols)


# --------------------------------------------------------------------------- features


@dataclass
class Features:
    """Layer vectors of the rows to train or predict on."""

    x: np.ndarray  # (N, L, D) float32
    track_ids: list[str]  # (N,) the track of each row (windows share their track's id)
    model_ids: set[str]
    settings_ids: set[str]


def read_features(
    store: str,
    layers: Sequence[int],
    track_ids: Sequence[str] | None = None,
    level: str = "track",
    storage_options: Mapping[str, Any] | None = None,
    scan_min_ids: int = 20_000,
) -> Features:
    """The layer vectors of ``track_ids`` (all tracks when ``None``) at track or window level.
    Up to ``scan_min_ids`` ids are pushed down as a filter; more are joined after a scan."""
    tref = store_ref(store, storage_options)
    ref = tref if level == "track" else store_ref(store, storage_options, "windows")
    ds = ref.open()
    check_layers(ds, layers)
    cols = ["track_id", *[layer_column(i) for i in layers]]
    filt = (
        id_filter("track_id", track_ids) if track_ids is not None and len(track_ids) <= scan_min_ids else None
    )
    tbl = ds.to_table(
        columns=cols + (["model_id", "settings_id"] if level == "track" else ["settings_id"]), filter=filt
    )
    if track_ids is not None and filt is None:
        mask = pc.is_in(tbl["track_id"], value_set=pa.array(list(track_ids), pa.string()))
        tbl = tbl.filter(mask)
    x = _stack_layers(tbl, layers)  # (N, L, D)
    tbl = tbl.drop_columns([layer_column(i) for i in layers])
    if level == "track":
        mids = set(tbl["model_id"].unique().to_pylist())
    else:
        t2 = tref.open().to_table(columns=["model_id"], filter=filt)
        mids = set(t2["model_id"].unique().to_pylist())
    return Features(x, tbl["track_id"].to_pylist(), mids, set(tbl["settings_id"].unique().to_pylist()))


def _stack_layers(tbl: pa.Table, layers: Sequence[int]) -> np.ndarray:
    """The layer columns as one C-contiguous float32 array (N, L, D), filled chunk by chunk (no
    intermediate copy of a whole column)."""
    n = tbl.num_rows
    cols = [tbl[layer_column(i)] for i in layers]
    dim = cols[0].type.list_size
    x = np.empty((n, len(layers), dim), np.float32)
    for j, col in enumerate(cols):
        at = 0
        for chunk in col.chunks:
            x[at : at + len(chunk), j] = to_matrix(chunk)
            at += len(chunk)
    return x
