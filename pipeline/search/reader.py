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

This module keeps the query logic (validation, ANN / exact search, filters, scoring, window
spans). What the store holds is :class:`pipeline.search.view.StoreView` (tables opened through
:class:`pipeline.store.tables.Store`, the only code that opens Lance), query by audio is
:class:`pipeline.search.query_audio.AudioQueries`, the result types are in
:mod:`pipeline.search.results` (all re-exported here).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import (
    InvalidQueryError,
    ModelMismatchError,
    StoreNotFoundError,
    UnknownLayerError,
    UnknownTrackError,
    one_line,
)
from pipeline.io.uris import AUDIO_EXTENSIONS
from pipeline.schemas import layer_column
from pipeline.search.query_audio import AudioQueries
from pipeline.search.results import (
    DEFAULT_LAYER,
    LEVELS,
    MAX_K,
    AudioQuery,
    IndexInfo,
    SearchHit,
    SearchResults,
    TrackQuery,
    json_safe,
)
from pipeline.search.view import StoreView
from pipeline.store.tables import in_list, sql_str

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

# Upper bound on how many window rows one window-level query asks Lance for.
_MAX_WINDOW_FETCH = 100_000


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


def _looks_like_audio(query: str) -> bool:
    if "://" in query:
        return True
    return os.path.splitext(query)[1].lower() in AUDIO_EXTENSIONS or os.path.isfile(query)


# --------------------------------------------------------------------------- the store


class StoreReader(StoreView, AudioQueries):
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
