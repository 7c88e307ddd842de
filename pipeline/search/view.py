"""What an embedding store holds, as :class:`pipeline.search.reader.StoreReader` reads it: the
tables opened (through the one :class:`pipeline.store.tables.Store` handle) at the versions to read
(:mod:`pipeline.store.snapshots`), their layers, dimension, models and row counts, the ANN index of
each vector column, and row lookups. :class:`StoreView` is the reader's base class; the queries
are in :mod:`pipeline.search.reader`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InvalidQueryError, ModelUnavailableError, StoreNotFoundError, UnknownTrackError
from pipeline.schemas import RESERVED_COLUMNS, layer_column, parse_layer_column
from pipeline.search.results import DEFAULT_LAYER, IndexInfo, json_safe
from pipeline.store.snapshots import reading_versions, snapshot_runs_of
from pipeline.store.tables import Store, in_list, sql_str

# Columns of ``tracks`` that are pipeline bookkeeping rather than something to show next to a hit.
_HIDDEN_TRACK_COLUMNS = frozenset(
    {
        "track_id",
        "content_version",
        "sample_rate_in",
        "channels_in",
        "warnings",
        "model_id",
        "settings_id",
        "run_id",
        "embedded_at",
    }
)


class StoreView:
    """The opened tables of a store root and what they hold (see :class:`pipeline.search.reader.StoreReader`)."""

    def __init__(
        self, root: str, storage_options: Mapping[str, Any] | None = None, model: str | None = None
    ) -> None:
        self.root = str(root).rstrip("/") or "/"
        self.pinned_model = model
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.tables = Store(self.root, self.storage_options, create=False)  # the one handle on the root
        self.model: Any = None  # the query-by-audio model once set (see set_model / load_model)
        self._lock = threading.RLock()
        self._model_lock = threading.Lock()
        self._index_cache: dict[tuple[str, int, str], IndexInfo | None] = {}
        self._load()

    # ---- opening

    def uri(self, table: str) -> str:
        """URI of ``{table}.lance`` under the root."""
        return self.tables.uri(table)

    def _open(self, table: str, required: bool, version: int | str | None = None) -> Any:
        """``table`` (latest, or a pinned version or tag), ``None`` when absent and not ``required``."""
        uri = self.uri(table)
        ds = self.tables.open(table, version)
        if ds is None and required:
            missing = "://" not in uri and not os.path.isdir(uri)
            raise StoreNotFoundError(
                f"no embedding store at {self.root}: "
                + (f"{uri} does not exist" if missing else f"cannot open {uri}")
            )
        return ds

    def _load(self) -> None:
        run_id = self._run_of_model(self.pinned_model) if self.pinned_model else None
        for attempt in range(2):
            latest = self._open("tracks", required=True)  # StoreNotFoundError first
            snap = reading_versions(
                lambda t, latest=latest: latest if t == "tracks" else self._open(t, required=False), run_id
            )
            try:
                pinned = snap.versions["tracks"]
                tracks = latest if pinned is None else self._open("tracks", required=True, version=pinned)
                windows = self._open("windows", required=False, version=snap.versions["windows"])
                break
            except (ValueError, OSError):  # the migration's pin went away meanwhile: read again
                if attempt or run_id is not None:
                    raise
        assert tracks is not None
        self.snapshot: str = snap.reason
        self._set_tables(tracks, windows)

    def _run_of_model(self, model_id: str) -> str:
        """The newest ``ok`` run of ``model_id`` whose versions are kept (``--keep-previous``)."""
        runs = self._open("runs", required=False)
        rows = [] if runs is None else runs.to_table(columns=["run_id", "model_id", "status"]).to_pylist()
        ours = {r["run_id"] for r in rows if r["model_id"] == model_id and r["status"] == "ok"}
        tracks = self._open("tracks", required=True)
        kept = [r for r in snapshot_runs_of(tracks) if r in ours]
        if not kept:
            models = sorted({r["model_id"] for r in rows if r["status"] == "ok" and r["model_id"]})
            raise ModelUnavailableError(
                f"no kept run of model {model_id} in this store (models of ok runs: {', '.join(models) or 'none'}; "
                "a refresh keeps --keep-previous earlier runs)"
            )
        return kept[0]

    def _set_tables(self, tracks: Any, windows: Any | None) -> None:
        schema = tracks.schema
        layers, dims = [], set()
        for f in schema:
            ix = parse_layer_column(f.name)
            if ix is not None and pa.types.is_fixed_size_list(f.type):
                layers.append(ix)
                dims.add(f.type.list_size)
        if len(dims) > 1:
            raise InvalidQueryError(
                f"tracks.lance mixes vector sizes {sorted(dims)}; not a store this code wrote"
            )
        meta = [
            f.name
            for f in schema
            if f.name not in RESERVED_COLUMNS
            and parse_layer_column(f.name) is None
            and not pa.types.is_fixed_size_list(f.type)
        ]
        n_tracks = tracks.count_rows()
        model_ids: list[str] = []
        if n_tracks and "model_id" in schema.names:
            col = tracks.to_table(columns=["model_id"]).column("model_id")
            model_ids = sorted(v for v in pc.unique(col).to_pylist() if v is not None)
        win_layers: list[int] = []
        n_windows = None
        if windows is not None:
            win_layers = sorted(ix for f in windows.schema if (ix := parse_layer_column(f.name)) is not None)
            n_windows = windows.count_rows()
        with self._lock:
            self._tracks = tracks
            self._windows = windows
            self.layers: list[int] = sorted(layers)
            self.dim: int | None = dims.pop() if dims else None
            self.metadata_columns: list[str] = meta
            self.num_tracks: int = n_tracks
            self.num_windows: int | None = n_windows
            self.window_layers: list[int] = win_layers
            self.model_ids: list[str] = model_ids
            self.model_id: str | None = model_ids[0] if len(model_ids) == 1 else None
            self._index_cache.clear()

    def refresh(self) -> Self:
        """Move to the versions to read now (new rows, new indexes, the end of a model change);
        returns ``self``."""
        # fresh dataset objects, swapped in under the lock: searches in flight keep their version
        self._load()
        return self

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: layers, dim, model, row counts, indexes per layer."""
        idx: dict[str, Any] = {}
        for table, ds, layers in (
            ("tracks", self._tracks, self.layers),
            ("windows", self._windows, self.window_layers),
        ):
            if ds is None:
                continue
            idx[table] = {
                str(ix): (asdict(info) if (info := self.index_info(table, ix)) else None) for ix in layers
            }
        return {
            "root": self.root,
            "layers": self.layers,
            "dim": self.dim,
            "model_id": self.model_id,
            "model_ids": self.model_ids,
            "num_tracks": self.num_tracks,
            "num_windows": self.num_windows,
            "window_layers": self.window_layers,
            "metadata_columns": self.metadata_columns,
            "indexes": idx,
        }

    # ---- indexes

    def _dataset(self, table: str) -> Any:
        ds = self._tracks if table == "tracks" else self._windows
        if ds is None:
            raise InvalidQueryError(
                f"this store has no {table}.lance (was the pipeline run with window output?)"
            )
        return ds

    def index_info(self, table: str, layer: int) -> IndexInfo | None:
        """The ANN index on ``layer_{layer}`` of ``table``, or ``None`` (exact search)."""
        ds = self._dataset(table)
        column = layer_column(layer)
        key = (table, ds.version, column)
        with self._lock:
            if key in self._index_cache:
                return self._index_cache[key]
        info = None
        for desc in ds.describe_indices():
            if list(desc.field_names) != [column] or not str(desc.index_type).upper().startswith("IVF"):
                continue
            details = desc.details if isinstance(desc.details, dict) else {}
            try:
                parts = len(ds.get_ivf_model(desc.name).centroids)
            except Exception:  # noqa: BLE001 - only used to pick nprobes
                parts = None
            info = IndexInfo(
                name=desc.name,
                index_type=str(desc.index_type).upper(),
                metric=str(details.get("metric_type", "")).lower(),
                num_partitions=parts,
                num_indexed_rows=int(desc.num_rows_indexed),
            )
            break
        with self._lock:
            self._index_cache[key] = info
        return info

    # ---- lookups

    def _track_row(self, track_id: str, columns: Sequence[str]) -> dict[str, Any] | None:
        tbl = self._tracks.to_table(columns=list(columns), filter=f"track_id = {sql_str(track_id)}", limit=1)
        return tbl.to_pylist()[0] if tbl.num_rows else None

    def has_track(self, track_id: str) -> bool:
        return self._track_row(track_id, ["track_id"]) is not None

    def vector(self, track_id: str, layer: int = DEFAULT_LAYER) -> np.ndarray:
        """The stored track-level vector of ``track_id`` for ``layer``."""
        self._check_layer(layer, "track")
        row = self._track_row(track_id, ["track_id", layer_column(layer)])
        if row is None:
            raise UnknownTrackError(
                f"unknown track_id {track_id!r}: not in {self.uri('tracks')} ({self.num_tracks} tracks)"
            )
        return np.asarray(row[layer_column(layer)], dtype=np.float32)

    def _metadata(self, track_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not track_ids:
            return {}
        cols = ["track_id", *self._meta_columns()]
        tbl = self._tracks.to_table(columns=cols, filter=in_list("track_id", list(dict.fromkeys(track_ids))))
        return {r.pop("track_id"): {k: json_safe(v) for k, v in r.items()} for r in tbl.to_pylist()}

    def _meta_columns(self) -> list[str]:
        names = self._tracks.schema.names
        base = [c for c in ("uri", "duration_s", "num_windows") if c in names]
        return base + [c for c in self.metadata_columns if c not in _HIDDEN_TRACK_COLUMNS]
