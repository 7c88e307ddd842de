"""The refresh plan: the catalog rows, their object versions, and what to do with each track
(new, changed, settings, metadata, unchanged, removed, ...) compared with the store."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.errors import RefreshError, error_type, one_line, redact
from pipeline.flow.runtime import ensure_ray
from pipeline.io.catalog import RejectedRow, iter_catalog
from pipeline.io.objects import content_version, object_versions
from pipeline.io.uris import UriPolicy
from pipeline.runs.model_info import ModelInfo
from pipeline.runs.settings import LOOKUP_RAY_MIN_ROWS, EmbedJob
from pipeline.store.tables import StoreWriter


def catalog_policy(job: EmbedJob) -> UriPolicy:
    """The URI policy of a job: ``--allowed-prefixes``, else the catalog's own directory/prefix."""
    if job.allowed_prefixes:
        return UriPolicy(allowed_prefixes=tuple(job.allowed_prefixes))
    return UriPolicy.for_catalog(job.catalog, job.allowed_prefixes)


def catalog_rows(job: EmbedJob) -> tuple[list[dict[str, Any]], list[RejectedRow], list[str]]:
    """The catalog's rows (``track_id``, ``uri``, ``metadata_json``, and ``content_version`` when
    the catalog states versions: :func:`pipeline.io.catalog.catalog_version`), its rejected rows
    and its metadata column names. Streams the catalog: no list of entries is kept beside the rows."""
    policy = catalog_policy(job)
    rows: list[dict[str, Any]] = []
    rejected: list[RejectedRow] = []
    meta_cols: dict[str, None] = {}
    any_version = False
    for e in iter_catalog(job.catalog, job.storage_options or None, limit=job.limit, policy=policy,
                          max_row_chars=job.max_row_chars):  # fmt: skip
        if isinstance(e, RejectedRow):
            rejected.append(e)
            continue
        for k in e.metadata:
            if k not in meta_cols:
                meta_cols[k] = None
        row = {
            "track_id": e.track_id,
            "uri": e.uri,
            "metadata_json": json.dumps(e.metadata) if e.metadata else "{}",
        }
        if e.content_version is not None:
            row["content_version"] = e.content_version
            any_version = True
        rows.append(row)
    if any_version:  # every row has the key (None where the catalog leaves it empty)
        for r in rows:
            r.setdefault("content_version", None)
    return rows, rejected, list(meta_cols)


def _lookup_many(rows: Sequence[Mapping[str, Any]], storage_options: dict | None, threads: int) -> list[dict]:
    """``content_version`` of each row's uri from object metadata, ``threads`` lookups at a time."""

    def one(r: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return {"track_id": r["track_id"], "content_version": content_version(r["uri"], storage_options=storage_options),
                    "error_type": None, "message": None}  # fmt: skip
        except Exception as e:  # a missing/unreadable object is an error row, not a failed run
            return {"track_id": r["track_id"], "content_version": None, "error_type": error_type(e),
                    "message": redact(one_line(str(e) or type(e).__name__))}  # fmt: skip

    if len(rows) <= 1 or threads <= 1:
        return [one(r) for r in rows]
    with cf.ThreadPoolExecutor(max_workers=min(threads, len(rows))) as pool:
        return list(pool.map(one, rows))


def _lookup_batch(batch: pa.Table, storage_options: dict | None, threads: int) -> pa.Table:
    """Ray Data ``map_batches`` function: object metadata lookups of one block."""
    out = _lookup_many(batch.select(["track_id", "uri"]).to_pylist(), storage_options, threads)
    return pa.Table.from_pylist(out, schema=schemas.LOOKUP_SCHEMA)


@dataclass
class Versions:
    """Result of :func:`lookup_versions`: ``by_id`` maps track_id to its ``content_version`` (a
    string) or, for a failed lookup, ``{content_version: None, error_type, message}``; ``requests`` counts the object-store requests made (LIST pages +
    HEADs; 0 when the catalog states every version needed)."""

    by_id: dict[str, str | dict[str, Any]] = field(default_factory=dict)
    requests: int = 0
    from_catalog: int = 0
    listed_prefixes: int = 0
    heads: int = 0

    def of(self, row: Mapping[str, Any]) -> str | None:
        """The version of a catalog row: looked up, else the catalog's."""
        v = self.by_id.get(row["track_id"])
        if v is None:
            return row.get("content_version")
        return v if isinstance(v, str) else v.get("content_version")


def lookup_versions(
    rows: Sequence[Mapping[str, Any]],
    storage_options: dict | None,
    threads: int = 32,
    ray_min_rows: int = LOOKUP_RAY_MIN_ROWS,
    stored_ids: Container[str] | pa.Array | pa.ChunkedArray | None = None,
    min_per_prefix: int = 2,
) -> Versions:
    """The ``content_version`` of the catalog rows that need one, with as few requests as possible:

    1. rows whose track_id is not in ``stored_ids`` (a container, or an Arrow array such as the
       stored ``track_id`` column) need none (they are new whatever their version; the fetch
       records it). ``stored_ids=None`` looks up every row;
    2. a version the catalog states (``content_version`` in the row, from the catalog's version
       columns: :func:`pipeline.io.catalog.catalog_version`) is trusted: no request, and no
       entry in ``by_id`` (:func:`make_plan` reads the row's; :meth:`Versions.of` gives either);
    3. the rest: their parent prefixes are listed (:func:`pipeline.io.objects.object_versions`,
       one LIST per 1,000 objects), and only uris no listing covers get a HEAD each: a thread
       pool here, or a Ray map (blocks of 500 rows, each with its own thread pool) when at least
       ``ray_min_rows`` of them are left.
    """
    out = Versions()
    need: list[Mapping[str, Any]] = []
    if stored_ids is None:
        wanted: Iterable[bool] = itertools.repeat(True, len(rows))
    elif isinstance(stored_ids, pa.Array | pa.ChunkedArray):
        import pyarrow.compute as pc

        ids = pa.array([r["track_id"] for r in rows], pa.string())
        values = stored_ids.combine_chunks() if isinstance(stored_ids, pa.ChunkedArray) else stored_ids
        wanted = pc.is_in(ids, value_set=values.cast(pa.string())).to_numpy(zero_copy_only=False).tolist()
        del ids
    else:
        wanted = (r["track_id"] in stored_ids for r in rows)
    for r, want in zip(rows, wanted, strict=True):
        if not want:
            continue
        if r.get("content_version") is not None:  # stated by the catalog: make_plan reads the row's
            out.from_catalog += 1
        else:
            need.append(r)
    if not need:
        return out
    found = object_versions((r["uri"] for r in need), storage_options, min_per_prefix=min_per_prefix,
                            threads=threads, head=False)  # fmt: skip
    out.requests, out.listed_prefixes = found.lists, found.prefixes
    unlisted = set(found.unlisted)
    heads: list[Mapping[str, Any]] = []
    for r in need:
        uri, tid = r["uri"], r["track_id"]
        if uri in unlisted:
            heads.append(r)
        elif uri in found.versions:
            out.by_id[tid] = found.versions[uri]  # a plain string: millions of these
        else:
            et, msg = found.errors[uri]
            out.by_id[tid] = {"track_id": tid, "content_version": None, "error_type": et, "message": msg}
    if not heads:
        return out
    if len(heads) >= ray_min_rows:
        import ray

        ensure_ray()
        items = [{"track_id": r["track_id"], "uri": r["uri"]} for r in heads]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 500 + 1, 1000)))
        res = ds.map_batches(_lookup_batch, fn_kwargs={"storage_options": storage_options, "threads": threads},
                             batch_format="pyarrow", batch_size=None)  # fmt: skip
        parts = [t for t in ray.get(res.to_arrow_refs()) if t.num_rows]
        looked = pa.concat_tables(parts).to_pylist() if parts else []
    else:
        looked = _lookup_many(heads, storage_options, threads)
    out.heads = len(heads)
    out.requests += len(heads)
    out.by_id.update((r["track_id"], r) for r in looked)
    return out


PLAN_KINDS = (
    "new",
    "changed",
    "settings",
    "metadata",
    "unchanged",
    "removed",
    "kept",
    "lookup_failed",
    "rejected",
)


@dataclass
class Plan:
    """What a refresh will do. ``new``/``changed``/``settings`` are catalog rows to embed (with
    the planned ``content_version``); ``metadata`` are (catalog row, stored row) pairs; the rest
    are track ids (``lookup_failed``/``rejected``: error rows)."""

    new: list[dict[str, Any]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    lookup_failed: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    stored_tracks: int = 0

    @property
    def todo(self) -> list[dict[str, Any]]:
        """Catalog rows to embed, in catalog order within each kind."""
        return self.new + self.changed + self.settings

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in PLAN_KINDS}

    def samples(self, n: int) -> dict[str, list[str]]:
        def tid(x: Any) -> str:
            if isinstance(x, str):
                return x
            return str(x.get("row", x).get("track_id"))

        return {k: [tid(x) for x in getattr(self, k)[:n]] for k in PLAN_KINDS if k != "unchanged"}


#: Plan kinds as codes of the vectorised comparison in :func:`make_plan`.
_NEW, _FAILED, _CHANGED, _SETTINGS, _SAME = range(5)
#: Rows whose catalog metadata is compared with the stored columns at a time.
_META_SLICE = 65536
#: Rows compared with the stored columns at a time (bounds the copies the comparison makes).
_COMPARE_SLICE = 1 << 20
#: Stored columns with a few distinct values, held dictionary-encoded (4 bytes a row, not ~70).
_DICTIONARY_COLUMNS = ("settings_id", "run_id")


def _equal(got: pa.ChunkedArray | pa.Array, value: Any) -> pa.ChunkedArray | pa.Array:
    """``got == value`` element-wise; a dictionary-encoded ``got`` compared with a scalar is
    compared on its dictionary (no decoded copy of the column)."""
    import pyarrow.compute as pc

    if isinstance(value, pa.Scalar) and pa.types.is_dictionary(got.type):
        chunks = got.chunks if isinstance(got, pa.ChunkedArray) else [got]
        return pa.chunked_array(
            [pc.take(pc.equal(c.dictionary, value), c.indices) for c in chunks], pa.bool_()
        )
    return pc.equal(got, value)


def make_plan(
    rows: Sequence[Mapping[str, Any]],
    stored: pa.Table | None,
    versions: Mapping[str, str | Mapping[str, Any]],
    settings_id: str,
    meta_cols: Sequence[str],
    delete_missing: bool,
    present_ids: Iterable[str] = (),
) -> Plan:
    """Compare catalog ``rows`` (track_id, uri, metadata_json) with the ``stored`` track rows
    (track_id, uri, content_version, settings_id and the metadata columns).

    ``versions`` maps track_id to its looked-up ``content_version`` (a string, or a mapping with
    ``content_version`` or ``error_type``/``message``); a row without an
    entry uses its own ``content_version`` (stated by the catalog), and a row not stored needs
    none (it is new; its ``content_version`` is the catalog's or ``None``). ``present_ids`` are
    ids of catalog rows that were rejected: they count as present, never as removed.

    The stored table stays Arrow: it is joined to the catalog ids (``index_in``) and compared
    column by column; only the rows of a kind other than ``unchanged`` become dicts.
    """
    import numpy as np
    import pyarrow.compute as pc

    plan = Plan()
    n = len(rows)
    tids = pa.array([r["track_id"] for r in rows], pa.string())
    cvs: list[str | None] = []
    failed = np.zeros(n, dtype=bool)  # a lookup error
    for i, r in enumerate(rows):
        v = versions.get(r["track_id"])
        if v is None:
            cvs.append(r.get("content_version"))
        elif isinstance(v, str):
            cvs.append(v)
        else:
            cvs.append(v.get("content_version"))
            failed[i] = bool(v.get("error_type"))
    cv = pa.array(cvs, pa.string())
    del cvs
    no_cv = cv.is_null().to_numpy(zero_copy_only=False)
    s_ids = stored["track_id"].combine_chunks() if stored is not None and stored.num_rows else None
    if s_ids is None:
        pos = pa.nulls(n, pa.int32())
        plan.stored_tracks = 0
    else:
        pos = pc.index_in(tids, value_set=s_ids)
        plan.stored_tracks = pc.count_distinct(s_ids).as_py()
    is_stored = pos.is_valid().to_numpy(zero_copy_only=False)
    codes = np.full(n, _SAME, dtype=np.int8)
    if s_ids is not None and n:

        def differs(col: str, value: Callable[[int, int], Any]) -> np.ndarray:
            """Catalog row i's ``value`` differs from its stored ``col`` (not stored: differs),
            compared a slice at a time so that no full-length copy of the column is made."""
            out = np.ones(n, dtype=bool)
            if col not in stored.column_names:
                return out
            for a in range(0, n, _COMPARE_SLICE):
                b = min(n, a + _COMPARE_SLICE)
                eq = _equal(stored[col].take(pos.slice(a, b - a)), value(a, b))
                out[a:b] = np.logical_not(pc.fill_null(eq, False).to_numpy(zero_copy_only=False))
            return out

        changed = differs("content_version", lambda a, b: cv.slice(a, b - a))
        changed |= differs("uri", lambda a, b: pa.array([r["uri"] for r in rows[a:b]], pa.string()))
        codes[differs("settings_id", lambda a, b: pa.scalar(settings_id, pa.string()))] = _SETTINGS
        codes[changed] = _CHANGED
        del changed
    codes[~is_stored] = _NEW
    codes[no_cv & is_stored] = _FAILED
    codes[failed] = _FAILED
    codes[~is_stored & ~failed] = _NEW  # new whatever its version: the fetch records it
    metadata_ix: set[int] = set()
    same = np.flatnonzero(codes == _SAME)
    if meta_cols and len(same):
        present = [m for m in meta_cols if stored is not None and m in stored.column_names]
        for a in range(0, len(same), _META_SLICE):
            ix = same[a : a + _META_SLICE]
            at = pos.take(pa.array(ix))
            cur = {m: stored[m].take(at).to_pylist() for m in present}
            for j, i in enumerate(ix.tolist()):
                meta = json.loads(rows[i].get("metadata_json") or "{}")
                if any(meta.get(m) != (cur[m][j] if m in cur else None) for m in meta_cols):
                    metadata_ix.add(i)
    stored_of: dict[int, dict[str, Any]] = {}
    if metadata_ix:
        order = sorted(metadata_ix)
        got = stored.take(pos.take(pa.array(order))).to_pylist()
        stored_of = dict(zip(order, got, strict=True))
    for i, c in enumerate(codes.tolist()):
        r = rows[i]
        tid = r["track_id"]
        if c == _SAME and i not in metadata_ix:
            plan.unchanged.append(tid)
        elif c == _FAILED:
            v = versions.get(tid)
            v = v if isinstance(v, Mapping) else {}
            plan.lookup_failed.append({"track_id": tid, "uri": r["uri"], "stage": "lookup",
                                       "error_type": v.get("error_type") or "FetchError",
                                       "message": v.get("message") or "no content version"})  # fmt: skip
        else:
            row = {**r, "content_version": cv[i].as_py()}
            if c == _NEW:
                plan.new.append(row)
            elif c == _CHANGED:
                plan.changed.append(row)
            elif c == _SETTINGS:
                plan.settings.append(row)
            else:
                plan.metadata.append({"row": row, "stored": stored_of[i]})
    if s_ids is not None:
        seen = pa.concat_arrays([tids, pa.array(list(present_ids), pa.string())])
        gone = s_ids.filter(pc.invert(pc.is_in(s_ids, value_set=seen)))
        (plan.removed if delete_missing else plan.kept).extend(dict.fromkeys(gone.to_pylist()))
    return plan


def read_stored(store: StoreWriter) -> tuple[Any, pa.Table | None]:
    """``tracks.lance`` and the projection the plan compares with: ``track_id``, ``uri``,
    ``content_version``, ``settings_id``, ``run_id`` and the metadata columns; ``settings_id``
    and ``run_id`` dictionary-encoded (a handful of distinct values in millions of rows)."""
    ds = store.open("tracks")
    if ds is None:
        return None, None
    cols = [
        "track_id",
        "uri",
        "content_version",
        "settings_id",
        "run_id",
        *schemas.metadata_columns(ds.schema),
    ]
    batches = []
    for b in ds.to_batches(columns=cols, batch_size=1 << 16):
        arrays = [b.column(c).dictionary_encode() if c in _DICTIONARY_COLUMNS else b.column(c) for c in cols]
        batches.append(pa.RecordBatch.from_arrays(arrays, names=cols))
    if not batches:
        return ds, ds.schema.empty_table().select(cols)
    schema = pa.schema([batches[0].schema.field(c) for c in cols])
    return ds, pa.Table.from_batches(batches, schema=schema)


def check_schemas(store: StoreWriter, info: ModelInfo, meta_cols: Sequence[str]) -> None:
    """Refuse a refresh whose settings change a table's schema (layers or vector size)."""
    layers, dim = info.settings.layers, info.dim
    expected = {
        "tracks": schemas.tracks_schema(layers, dim, meta_cols),
        "windows": schemas.windows_schema(layers, dim),
    }
    if info.settings.frames_hz:
        expected["frames"] = schemas.frames_schema(layers, dim)
    for name, want in expected.items():
        ds = store.open(name)
        if ds is None:
            continue
        got = ds.schema.remove_metadata()
        if name == "tracks":  # columns added by the insights jobs are not the embed job's schema
            got = pa.schema([f for f in got if not schemas.is_derived_column(f.name)])
        if not got.equals(want, check_metadata=False):
            have = [f"{f.name}:{f.type}" for f in got if schemas.parse_layer_column(f.name) is not None]
            need = [f"{f.name}:{f.type}" for f in want if schemas.parse_layer_column(f.name) is not None]
            raise RefreshError(
                f"{name}.lance has vector columns {have} but these settings produce {need}: a refresh "
                "cannot change layers or the model size in place; rebuild with embed_catalog (or refresh "
                "into a new store)"
            )
