"""Similarity search over the embedding store (``tracks.lance`` / ``windows.lance``).

Open a store with :func:`open_store` and call :meth:`Store.search`::

    store = open_store("s3://bucket/store", storage_options={...})
    hits = store.search("track-123", layer=12, k=10, where="genre = 'jazz'")
    for h in hits:
        print(h.rank, h.score, h.track_id, h.metadata.get("title"))

What the store holds is read from the data, never from flags: the vector layers and their
dimension from the ``layer_{ix}`` columns of ``tracks``, the model from its ``model_id`` column,
the index (if any) from the Lance index metadata.

Scores are cosine similarities (``1 - cosine distance``; 1 = same direction). Search runs on a
Lance cosine ANN index when :func:`pipeline.search.index.build_indexes` made one for the column, else it
is exact (a flat scan; ``SearchResults.exact`` is ``True``). Rows added after the index was built
are searched exactly (Lance scans unindexed fragments) until the index is optimized.

A query is one of:

* a vector (``numpy`` array or list of floats, of the store's dimension);
* a ``track_id`` present in the store: its stored vector of the same layer is the query and the
  track itself is left out of the results;
* an audio file path or URI (``s3://...``): embedded through the pipeline's own path
  (:func:`pipeline.engine.inference.embed_uri`) with a model whose ``model_id`` must equal the store's.

``where`` is a Lance SQL predicate over the table's columns (e.g. ``genre = 'jazz' AND
duration_s > 60``) applied as a *prefilter*: the ``k`` nearest among matching rows are returned,
never fewer than ``k`` when ``k`` rows match. At window level it may use the columns of
``windows.lance`` or, when it does not fit those, the columns of ``tracks.lance`` (it then selects
the tracks whose windows are searched); one predicate cannot mix both.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import (
    AudioQueryError,
    InvalidQueryError,
    ModelMismatchError,
    ModelUnavailableError,
    StoreNotFoundError,
    UnknownLayerError,
    UnknownTrackError,
    one_line,
)
from pipeline.io.objects import fsspec_options, lance_options
from pipeline.io.uris import AUDIO_EXTENSIONS
from pipeline.schemas import RESERVED_COLUMNS, layer_column, parse_layer_column
from pipeline.store.snapshots import reading_versions, snapshot_runs_of
from pipeline.store.tables import in_list, sql_str

if TYPE_CHECKING:  # pragma: no cover
    import lance

__all__ = [
    "DEFAULT_LAYER",
    "LEVELS",
    "MAX_K",
    "AudioQuery",
    "IndexInfo",
    "SearchHit",
    "SearchResults",
    "StoreReader",
    "TrackQuery",
    "open_store",
]

DEFAULT_LAYER = 12
LEVELS = ("track", "window")
MAX_K = 1000
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
# Upper bound on how many window rows one window-level query asks Lance for.
_MAX_WINDOW_FETCH = 100_000


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SearchHit:
    """One result. ``score`` is the cosine similarity to the query (higher is closer).

    ``metadata`` holds the track's catalog columns (title, artist, ...) plus ``uri``,
    ``duration_s`` and ``num_windows``. Window-level hits carry the best window of the track:
    ``start_s`` / ``end_s`` (seconds) and ``window_ix``; they are ``None`` at track level.
    """

    rank: int
    track_id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    start_s: float | None = None
    end_s: float | None = None
    window_ix: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.start_s is None:
            for key in ("start_s", "end_s", "window_ix"):
                d.pop(key)
        return d


class SearchResults(list):
    """The hits (a ``list[SearchHit]``, best first) plus how the search ran.

    Attributes: ``exact`` (no ANN index was used), ``index_type`` (``None`` when exact),
    ``nprobes`` / ``refine_factor`` / ``ef`` (the ANN parameters used), ``level``, ``layer``,
    ``k``, ``query`` (``"vector"``, ``"track"`` or ``"audio"``), ``query_track_id``,
    ``elapsed_ms``.
    """

    def __init__(self, hits: Sequence[SearchHit] = (), **info: Any) -> None:
        super().__init__(hits)
        self.exact: bool = bool(info.get("exact", True))
        self.index_type: str | None = info.get("index_type")
        self.nprobes: int | None = info.get("nprobes")
        self.refine_factor: int | None = info.get("refine_factor")
        self.ef: int | None = info.get("ef")
        self.level: str = info.get("level", "track")
        self.layer: int | None = info.get("layer")
        self.k: int | None = info.get("k")
        self.query: str = info.get("query", "vector")
        self.query_track_id: str | None = info.get("query_track_id")
        self.elapsed_ms: float = float(info.get("elapsed_ms", 0.0))

    def info(self) -> dict[str, Any]:
        """How the search ran, as a JSON-able dict (everything but the hits)."""
        return {
            "level": self.level,
            "layer": self.layer,
            "k": self.k,
            "query": self.query,
            "query_track_id": self.query_track_id,
            "exact": self.exact,
            "index_type": self.index_type,
            "nprobes": self.nprobes,
            "refine_factor": self.refine_factor,
            "ef": self.ef,
            "elapsed_ms": round(self.elapsed_ms, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.info(), "hits": [h.to_dict() for h in self]}


@dataclass(frozen=True)
class TrackQuery:
    """Explicit query by ``track_id`` (a plain ``str`` is tried as a track id first)."""

    track_id: str


@dataclass(frozen=True)
class AudioQuery:
    """Explicit query by audio path or URI (a plain ``str`` that is no track id is audio)."""

    uri: str


@dataclass(frozen=True)
class IndexInfo:
    """The ANN index of one vector column, as Lance describes it."""

    name: str
    index_type: str
    metric: str
    num_partitions: int | None
    num_indexed_rows: int


# --------------------------------------------------------------------------- helpers


def _and(*preds: str | None) -> str | None:
    parts = [p for p in preds if p]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else " AND ".join(f"({p})" for p in parts)


def _lance_message(exc: BaseException) -> str:
    """Lance's error text without the trailing Rust source location."""
    msg = one_line(str(exc))
    for marker in (", /home/", ", /Users/", ", rust/", ", src/"):
        if marker in msg:
            msg = msg.split(marker, 1)[0]
    return msg.removeprefix("Invalid user input: ")


def _is_not_found(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, FileNotFoundError) or "not found" in text or "does not exist" in text


def _looks_like_audio(query: str) -> bool:
    if "://" in query:
        return True
    return os.path.splitext(query)[1].lower() in AUDIO_EXTENSIONS or os.path.isfile(query)


def json_safe(v: Any) -> Any:
    """A value ready for JSON: non-finite floats become ``None``, dates ISO 8601 strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


# --------------------------------------------------------------------------- the store


class StoreReader:
    """Read-only handle on an embedding store root, for similarity search.

    Build with :func:`open_store`. Attributes (read from the data):

    ``root``, ``layers`` (sorted vector layers of ``tracks``), ``dim``, ``model_id`` (the single
    model of the store, ``None`` when empty or mixed), ``model_ids`` (all of them),
    ``metadata_columns`` (catalog columns of ``tracks``), ``num_tracks``, ``num_windows``
    (``None`` without ``windows.lance``), ``window_layers``.

    Thread-safe for concurrent :meth:`search` calls; :meth:`refresh` picks up new versions.

    Which versions it reads (:mod:`pipeline.store.snapshots`; ``snapshot`` says which): during a
    model change the store's complete state before it (the ``search`` pin), so every query answers
    over the whole catalog from one model; with ``model`` the newest kept run of that model;
    otherwise the latest.
    """

    def __init__(
        self, root: str, storage_options: Mapping[str, Any] | None = None, model: str | None = None
    ) -> None:
        self.root = str(root).rstrip("/") or "/"
        self.pinned_model = model
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self._lance_options = lance_options(self.root, self.storage_options)
        self.model: Any = None  # the query-by-audio model once set (see set_model / load_model)
        self._lock = threading.RLock()
        self._model_lock = threading.Lock()
        self._index_cache: dict[tuple[str, int, str], IndexInfo | None] = {}
        self._load()

    # ---- opening

    def uri(self, table: str) -> str:
        """URI of ``{table}.lance`` under the root."""
        return f"{self.root}/{table}.lance" if self.root != "/" else f"/{table}.lance"

    def _open(
        self, table: str, required: bool, version: int | str | None = None
    ) -> lance.LanceDataset | None:
        import lance

        uri = self.uri(table)
        if "://" not in uri and not os.path.isdir(uri):
            if required:
                raise StoreNotFoundError(f"no embedding store at {self.root}: {uri} does not exist")
            return None
        try:
            return lance.dataset(uri, version=version, storage_options=self._lance_options)
        except (ValueError, OSError) as e:
            if _is_not_found(e):
                if required:
                    raise StoreNotFoundError(
                        f"no embedding store at {self.root}: cannot open {uri}"
                    ) from None
                return None
            raise

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

    def _set_tables(self, tracks: lance.LanceDataset, windows: lance.LanceDataset | None) -> None:
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

    def refresh(self) -> StoreReader:
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

    def _dataset(self, table: str) -> lance.LanceDataset:
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

    # ---- model for query-by-audio

    def run_args(self) -> dict[str, Any]:
        """``args_json`` of the latest successful run of the store's model (``{}`` if unknown)."""
        runs = self._open("runs", required=False)
        if runs is None or self.model_id is None:
            return {}
        cols = [
            c
            for c in ("args_json", "model_id", "status", "finished_at", "started_at")
            if c in runs.schema.names
        ]
        rows = runs.to_table(columns=cols).to_pylist()
        rows = [r for r in rows if r.get("model_id") == self.model_id and r.get("args_json")]
        if not rows:
            return {}

        def when(r: dict[str, Any]) -> float:
            ts = r.get("finished_at") or r.get("started_at")
            return ts.timestamp() if hasattr(ts, "timestamp") else 0.0

        rows.sort(key=lambda r: (r.get("status") == "ok", when(r)))
        try:
            args = json.loads(rows[-1]["args_json"])
        except (TypeError, ValueError):
            return {}
        return args if isinstance(args, dict) else {}

    def check_model(self, model: Any) -> None:
        """Raise :class:`ModelMismatchError` unless ``model.model_id`` is the store's model."""
        mid = getattr(model, "model_id", None)
        if not self.model_ids:
            return  # empty store: nothing to compare against
        if mid not in self.model_ids:
            have = self.model_id or ", ".join(self.model_ids)
            raise ModelMismatchError(
                f"the query model {mid} is not the model that built this store ({have}): vectors of "
                "different models are not comparable; use the checkpoint that embedded the store"
            )

    def set_model(self, model: Any) -> None:
        """Use ``model`` for query-by-audio after checking it is the store's model."""
        self.check_model(model)
        self.model = model

    def load_model(
        self,
        checkpoint: str | None = None,
        stats: str | None = None,
        model_config: str | None = None,
        device: str | None = None,
    ) -> Any:
        """Load (via :func:`pipeline.engine.inference.load_model`) and check the query-by-audio model.

        Missing ``checkpoint`` / ``stats`` / ``model_config`` are taken from the store's run
        records (``runs.lance`` ``args_json``) of its model. Raises :class:`ModelUnavailableError`
        when no checkpoint is known and :class:`ModelMismatchError` when the loaded model is not
        the store's.
        """
        from pipeline.engine import inference

        args = self.run_args() if checkpoint is None else {}
        checkpoint = checkpoint or args.get("checkpoint")
        if not checkpoint:
            raise ModelUnavailableError(
                "query by audio needs the store's model: pass --checkpoint (and --stats / --model-config); "
                "the store's run records name none"
            )
        stats = stats if stats is not None else args.get("stats")
        model_config = model_config if model_config is not None else args.get("model_config")
        try:
            model = inference.load_model(
                checkpoint,
                stats,
                model_config,
                device,
                storage_options=fsspec_options(self.root, self.storage_options) or None,
            )
        except Exception as e:  # noqa: BLE001 - any load failure (missing file, hub offline...) is one reason
            raise ModelUnavailableError(f"cannot load the model {checkpoint}: {e}") from None
        self.set_model(model)
        return model

    def embed_audio(
        self, uri: str, layer: int, model: Any = None, storage_options: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """The track-level vector of ``layer`` for an audio file/URI, through the pipeline's embed
        path, with the window/hop of the store's runs. Checks the model first."""
        from pipeline.engine import inference
        from pipeline.errors import PipelineError

        if model is None:
            with self._model_lock:
                if self.model is None:
                    self.load_model()
            model = self.model
        self.check_model(model)
        args = self.run_args()
        kwargs: dict[str, Any] = {}
        for key in ("window_s", "hop_s", "loudness_target_db"):
            if isinstance(args.get(key), int | float):
                kwargs[key] = float(args[key])
        so = (
            storage_options
            if storage_options is not None
            else fsspec_options(self.root, self.storage_options) or None
        )
        try:
            with self._model_lock:
                emb = inference.embed_uri(str(uri), model, [layer], storage_options=so, **kwargs)
        except PipelineError as e:
            raise AudioQueryError(f"cannot embed {uri}: {e}") from None
        except (OSError, ValueError) as e:
            raise AudioQueryError(f"cannot embed {uri}: {e}") from None
        return np.asarray(emb.track[layer], dtype=np.float32)

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

    # ---- validation

    def _check_layer(self, layer: int, level: str) -> None:
        have = self.layers if level == "track" else self.window_layers
        table = "tracks" if level == "track" else "windows"
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or int(layer) not in have:
            avail = ", ".join(str(i) for i in have) or "none"
            raise UnknownLayerError(f"layer {layer} is not in {table}.lance; available layers: {avail}")

    def _query_vector(self, q: Any) -> np.ndarray:
        try:
            v = np.asarray(q, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidQueryError("the query vector must be a list of numbers") from None
        if v.ndim != 1:
            raise InvalidQueryError(f"the query vector must be 1-D, got shape {tuple(v.shape)}")
        if self.dim is not None and v.shape[0] != self.dim:
            raise InvalidQueryError(
                f"the query vector has {v.shape[0]} values; this store's vectors have {self.dim}"
            )
        if not np.all(np.isfinite(v)):
            raise InvalidQueryError("the query vector has NaN or infinite values")
        if not np.any(v):
            raise InvalidQueryError("the query vector is all zeros (cosine similarity is undefined)")
        return v

    # ---- search

    def search(
        self,
        query: Any,
        layer: int | None = DEFAULT_LAYER,
        k: int = 10,
        where: str | None = None,
        level: str = "track",
        nprobes: int | None = None,
        refine_factor: int | None = None,
        *,
        model: Any = None,
        model_id: str | None = None,
        audio_storage_options: Mapping[str, Any] | None = None,
    ) -> SearchResults:
        """The ``k`` nearest tracks (cosine) to ``query``, best first.

        Args:
            query: a vector, a ``track_id`` of the store (excluded from its own results), an
                audio path/URI, or an explicit :class:`TrackQuery` / :class:`AudioQuery`.
            layer: hidden-state layer to compare; ``None`` = the highest layer of the store.
            k: number of results, 1..``MAX_K``.
            where: Lance SQL predicate applied as a prefilter (see the module doc).
            level: ``"track"`` (track vectors) or ``"window"`` (window vectors; best window per
                track, each track at most once; a track/audio query uses its track vector).
            nprobes: IVF partitions to probe (with ``where``: the minimum; Lance probes more until
                ``k`` matching rows are found); default from :func:`pipeline.search.index.search_params`.
            refine_factor: re-rank ``k * refine_factor`` candidates with exact distances.
            model: model for an audio query (else :attr:`model`, else loaded from run records).
            model_id: for a vector query on a store that mixes models, the model it belongs to.
            audio_storage_options: s3fs-style options to fetch query audio (default: derived
                from the store's).

        Raises:
            UnknownTrackError, UnknownLayerError, InvalidQueryError, ModelMismatchError,
            ModelUnavailableError, AudioQueryError.
        """
        t0 = time.perf_counter()
        if level not in LEVELS:
            raise InvalidQueryError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= int(k) <= MAX_K:
            raise InvalidQueryError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
        k = int(k)
        for name, val in (("nprobes", nprobes), ("refine_factor", refine_factor)):
            if val is not None and (
                isinstance(val, bool) or not isinstance(val, int | np.integer) or val < 1
            ):
                raise InvalidQueryError(f"{name} must be a positive integer, got {val!r}")
        if where is not None and not str(where).strip():
            where = None
        if layer is None:
            layer = max(self.layers if level == "track" else self.window_layers, default=DEFAULT_LAYER)
        self._check_layer(layer, "track")
        if level == "window":
            self._dataset("windows")
            self._check_layer(layer, "window")
        layer = int(layer)

        kind, qvec, exclude, qmodel = self._resolve(query, layer, model, model_id, audio_storage_options)
        info: dict[str, Any] = {
            "level": level,
            "layer": layer,
            "k": k,
            "query": kind,
            "query_track_id": exclude,
        }
        if self.num_tracks == 0:
            return SearchResults([], exact=True, elapsed_ms=1e3 * (time.perf_counter() - t0), **info)
        if qmodel is None and len(self.model_ids) > 1:
            raise InvalidQueryError(
                f"this store mixes models ({', '.join(self.model_ids)}): pass model_id= for a vector query"
            )
        if level == "track":
            hits, plan = self._search_tracks(qvec, layer, k, where, exclude, qmodel, nprobes, refine_factor)
        else:
            hits, plan = self._search_windows(qvec, layer, k, where, exclude, qmodel, nprobes, refine_factor)
        return SearchResults(hits, elapsed_ms=1e3 * (time.perf_counter() - t0), **plan, **info)

    def _resolve(
        self, query: Any, layer: int, model: Any, model_id: str | None, audio_so: Mapping[str, Any] | None
    ) -> tuple[str, np.ndarray, str | None, str | None]:
        """(kind, query vector, track id to exclude, model id the vector belongs to)."""
        if isinstance(query, os.PathLike):
            query = AudioQuery(os.fspath(query))
        if isinstance(query, str):
            row = self._track_row(query, ["track_id", layer_column(layer), "model_id"])
            if row is not None:
                return "track", self._query_vector(row[layer_column(layer)]), query, row.get("model_id")
            if not _looks_like_audio(query):
                raise UnknownTrackError(
                    f"unknown track_id {query!r}: not in {self.uri('tracks')} ({self.num_tracks} tracks)"
                )
            query = AudioQuery(query)
        if isinstance(query, TrackQuery):
            row = self._track_row(query.track_id, ["track_id", layer_column(layer), "model_id"])
            if row is None:
                raise UnknownTrackError(
                    f"unknown track_id {query.track_id!r}: not in {self.uri('tracks')} ({self.num_tracks} tracks)"
                )
            return "track", self._query_vector(row[layer_column(layer)]), query.track_id, row.get("model_id")
        if isinstance(query, AudioQuery):
            if model is not None:
                self.check_model(model)
            if self.num_tracks == 0:
                return "audio", np.zeros(0, np.float32), None, None  # nothing to compare with
            vec = self.embed_audio(query.uri, layer, model=model, storage_options=audio_so)
            mid = getattr(model if model is not None else self.model, "model_id", None)
            return "audio", self._query_vector(vec), None, mid
        if isinstance(query, bytes | bytearray):
            raise InvalidQueryError("pass audio as a file path or URI, not bytes")
        if model_id is not None and self.model_ids and model_id not in self.model_ids:
            raise ModelMismatchError(
                f"model_id {model_id} has no vectors in this store ({', '.join(self.model_ids)})"
            )
        return "vector", self._query_vector(query), None, model_id or self.model_id

    def _plan(
        self, table: str, layer: int, k: int, nprobes: int | None, refine: int | None
    ) -> dict[str, Any]:
        """The search parameters for ``table``/``layer``: exact when there is no cosine index."""
        from pipeline.search.index import search_params

        info = self.index_info(table, layer)
        if info is None or info.metric not in ("cosine", ""):
            return {"exact": True, "index_type": None, "nprobes": None, "refine_factor": None, "ef": None}
        sp = search_params(info.index_type, info.num_partitions, k, nprobes=nprobes, refine_factor=refine)
        return {
            "exact": False,
            "index_type": info.index_type,
            "nprobes": sp.nprobes,
            "refine_factor": sp.refine_factor,
            "ef": sp.ef,
        }

    def _knn(
        self,
        table: str,
        layer: int,
        q: np.ndarray,
        k: int,
        filt: str | None,
        plan: Mapping[str, Any],
        columns: Sequence[str],
        where: str | None,
    ) -> pa.Table:
        """The ``k`` nearest rows of ``table`` (with ``_distance``), prefiltered by ``filt``.

        With an index, an unfiltered query probes exactly ``nprobes`` partitions (Lance's fixed
        ``nprobes``: fastest). A filtered query, or one whose fixed probes came back with fewer than
        ``k`` rows, uses Lance's adaptive probing (``minimum_nprobes``): more partitions are probed
        until ``k`` matching rows are found or the index is exhausted.
        """
        ds = self._dataset(table)

        def run(adaptive: bool) -> pa.Table:
            nearest: dict[str, Any] = {"column": layer_column(layer), "q": q, "k": int(k), "metric": "cosine"}
            if plan["exact"]:
                nearest["use_index"] = False
            else:
                nearest["minimum_nprobes" if adaptive else "nprobes"] = plan["nprobes"]
                if plan["refine_factor"]:
                    nearest["refine_factor"] = plan["refine_factor"]
                if plan["ef"]:
                    nearest["ef"] = max(int(plan["ef"]), int(k))
            return ds.to_table(
                columns=[*columns, "_distance"],
                nearest=nearest,
                filter=filt,
                prefilter=True if filt else None,
            )

        try:
            tbl = run(adaptive=bool(filt))
            if not plan["exact"] and not filt and tbl.num_rows < k and tbl.num_rows < ds.count_rows():
                tbl = run(adaptive=True)
            return tbl
        except (ValueError, OSError) as e:
            text = str(e)
            if where and (
                "parsing" in text or "field" in text.lower() or "Schema" in text or "sql" in text.lower()
            ):
                raise InvalidQueryError(f"bad where predicate {where!r}: {_lance_message(e)}") from None
            raise

    def _model_filter_tracks(self, qmodel: str | None) -> str | None:
        if len(self.model_ids) > 1 and qmodel:
            return f"model_id = {sql_str(qmodel)}"
        return None

    def _search_tracks(
        self,
        q: np.ndarray,
        layer: int,
        k: int,
        where: str | None,
        exclude: str | None,
        qmodel: str | None,
        nprobes: int | None,
        refine: int | None,
    ) -> tuple[list[SearchHit], dict[str, Any]]:
        plan = self._plan("tracks", layer, k + (1 if exclude else 0), nprobes, refine)
        filt = _and(where, self._model_filter_tracks(qmodel))
        fetch = k + (1 if exclude else 0)
        tbl = self._knn("tracks", layer, q, fetch, filt, plan, ["track_id", *self._meta_columns()], where)
        hits: list[SearchHit] = []
        for row in tbl.to_pylist():
            tid = row.pop("track_id")
            dist = row.pop("_distance")
            if tid == exclude or len(hits) == k:
                continue
            meta = {c: json_safe(row.get(c)) for c in self._meta_columns()}
            hits.append(SearchHit(rank=len(hits) + 1, track_id=tid, score=_score(dist), metadata=meta))
        return hits, plan

    def _window_filter(self, where: str | None, qmodel: str | None) -> tuple[str | None, bool]:
        """(filter over windows, False when nothing can match)."""
        windows = self._dataset("windows")
        model_pred = None
        if len(self.model_ids) > 1 and qmodel:
            runs = self._open("runs", required=False)
            run_ids: list[str] = []
            if runs is not None:
                run_ids = [
                    r["run_id"]
                    for r in runs.to_table(columns=["run_id", "model_id"]).to_pylist()
                    if r["model_id"] == qmodel
                ]
            if not run_ids:
                return None, False
            model_pred = in_list("run_id", run_ids)
        if not where:
            return model_pred, True
        try:
            windows.scanner(columns=["track_id"], filter=where).explain_plan()
            return _and(where, model_pred), True
        except (ValueError, OSError) as e_win:
            try:
                ids = self._tracks.to_table(columns=["track_id"], filter=where).column("track_id").to_pylist()
            except (ValueError, OSError) as e_tr:
                msg = _lance_message(e_tr if "field" not in str(e_tr).lower() else e_win)
                raise InvalidQueryError(f"bad where predicate {where!r}: {msg}") from None
        if not ids:
            return None, False
        return _and(in_list("track_id", ids), model_pred), True

    def _search_windows(
        self,
        q: np.ndarray,
        layer: int,
        k: int,
        where: str | None,
        exclude: str | None,
        qmodel: str | None,
        nprobes: int | None,
        refine: int | None,
    ) -> tuple[list[SearchHit], dict[str, Any]]:
        n_windows = int(self.num_windows or 0)
        plan = self._plan("windows", layer, k, nprobes, refine)
        filt, possible = self._window_filter(where, qmodel)
        if not possible or n_windows == 0:
            return [], plan
        per_track = max(1.0, n_windows / max(1, self.num_tracks))
        fetch = min(
            n_windows, _MAX_WINDOW_FETCH, max(k + 1, int(math.ceil(k * min(per_track, 16.0) * 1.5)) + 8)
        )
        best: dict[str, dict[str, Any]] = {}
        while True:
            plan = self._plan("windows", layer, fetch, nprobes, refine)
            tbl = self._knn(
                "windows", layer, q, fetch, filt, plan, ["track_id", "window_ix", "start_s", "end_s"], where
            )
            best = {}
            for row in tbl.to_pylist():
                tid = row["track_id"]
                if tid == exclude or tid in best:
                    continue
                best[tid] = row
            exhausted = tbl.num_rows < fetch or fetch >= min(n_windows, _MAX_WINDOW_FETCH)
            if len(best) >= k or exhausted:
                break
            fetch = min(n_windows, _MAX_WINDOW_FETCH, fetch * 4)
        top = list(best.values())[:k]
        meta = self._metadata([r["track_id"] for r in top])
        hits = [
            SearchHit(
                rank=i + 1,
                track_id=r["track_id"],
                score=_score(r["_distance"]),
                metadata=meta.get(r["track_id"], {}),
                start_s=json_safe(r["start_s"]),
                end_s=json_safe(r["end_s"]),
                window_ix=r["window_ix"],
            )
            for i, r in enumerate(top)
        ]
        return hits, plan


def _score(distance: float | None) -> float:
    """Cosine similarity from Lance's cosine distance."""
    return float("nan") if distance is None else float(1.0 - distance)


def open_store(
    uri: str, storage_options: Mapping[str, Any] | None = None, model: str | None = None
) -> StoreReader:
    """Open the embedding store at ``uri`` (a local directory or ``s3://bucket/prefix``).

    ``storage_options``: Lance/object_store keys (``aws_endpoint``, ``aws_access_key_id``,
    ``aws_secret_access_key``, ``aws_region``, ``allow_http``) or the pipeline's s3fs-style keys
    (``endpoint_url``, ``key``, ``secret``, ...); see :mod:`pipeline.io.objects`.

    ``model``: read the newest kept run of this model id (an earlier model, after a change).

    Raises:
        StoreNotFoundError: no ``tracks.lance`` under ``uri``.
        ModelUnavailableError: ``model`` has no kept run in the store.
    """
    if not uri or not str(uri).strip():
        raise StoreNotFoundError("no store given")
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return StoreReader(uri, storage_options, model=model)
