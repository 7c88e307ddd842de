"""The refresh plan made on the driver: the catalog and the stored projection as Arrow tables in
this process, decided as one partition by :func:`pipeline.runs.decide.decide` (the decision the
Ray planner, :mod:`pipeline.runs.ray_plan`, makes per hash partition)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schemas
from pipeline.engine.model_info import ModelInfo
from pipeline.errors import RefreshError
from pipeline.io.catalog import RejectedRow, iter_catalog
from pipeline.io.uris import UriPolicy
from pipeline.runs.decide import PLAN_KINDS, STORED_SCHEMA, LookupGroup, decide, stored_projection
from pipeline.runs.ray_plan import lookup_with_ray
from pipeline.runs.settings import LOOKUP_RAY_MIN_ROWS, EmbedJob
from pipeline.store.tables import Store


def catalog_policy(job: EmbedJob) -> UriPolicy:
    """The URI policy of a job: ``--allowed-prefixes``, else the catalog's own directory/prefix."""
    if job.allowed_prefixes:
        return UriPolicy(allowed_prefixes=tuple(job.allowed_prefixes))
    return UriPolicy.for_catalog(job.catalog, job.allowed_prefixes)


def catalog_table(job: EmbedJob) -> tuple[pa.Table, list[str]]:
    """The catalog as the plan reads it (:data:`pipeline.schemas.CATALOG_ROWS_SCHEMA`, one row
    per data row in catalog order, rejected rows with their reason: the duplicate-id policy is
    applied as it streams, so ``--limit`` counts ids that stand) and its metadata column names."""
    policy = catalog_policy(job)
    out: dict[str, list[Any]] = {f.name: [] for f in schemas.CATALOG_ROWS_SCHEMA}
    meta_cols: dict[str, None] = {}
    items = iter_catalog(job.catalog, job.storage_options or None, limit=job.limit, policy=policy,
                         max_row_chars=job.max_row_chars)  # fmt: skip
    for ix, e in enumerate(items):  # one item per data row: an entry or a rejected row
        bad = isinstance(e, RejectedRow)
        if not bad:
            meta_cols.update(dict.fromkeys(e.metadata))
        row = {"row_key": ix, "row": ix, "track_id": e.track_id, "uri": e.uri,
               "metadata_json": None if bad else json.dumps(e.metadata) if e.metadata else "{}",
               "content_version": None if bad else e.content_version,
               "error_type": e.error_type if bad else None, "message": e.message if bad else None}  # fmt: skip
        for k, v in row.items():
            out[k].append(v)
    return pa.table(out, schema=schemas.CATALOG_ROWS_SCHEMA), list(meta_cols)


def catalog_rows(job: EmbedJob) -> tuple[list[dict[str, Any]], list[RejectedRow], list[str]]:
    """The catalog's rows to embed (``track_id``, ``uri``, ``metadata_json``, and
    ``content_version`` when the catalog states versions: :func:`pipeline.io.catalog.catalog_version`),
    its rejected rows and its metadata column names."""
    t, meta_cols = catalog_table(job)
    ok = pc.is_null(t["error_type"])
    rows = t.filter(ok).select(["track_id", "uri", "metadata_json", "content_version"]).to_pylist()
    if t.filter(ok)["content_version"].null_count == len(rows):  # no version stated: no key
        for r in rows:
            del r["content_version"]
    rejected = [RejectedRow(r["row"], r["track_id"], r["uri"], r["error_type"], r["message"])
                for r in t.filter(pc.invert(ok)).to_pylist()]  # fmt: skip
    return rows, rejected, meta_cols


@dataclass
class Plan:
    """What a refresh will do, from :func:`pipeline.runs.decide.decide`'s rows
    (:func:`plan_of`): ``new``/``changed``/``settings``/``metadata`` are catalog rows (with
    the planned ``content_version``); ``lookup_failed``/``rejected`` error rows; the rest track
    ids. Catalog order within each kind."""

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
    requests: int = 0  # object-store requests made for versions

    @property
    def todo(self) -> list[dict[str, Any]]:
        """Catalog rows to embed, in catalog order within each kind."""
        return self.new + self.changed + self.settings

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in PLAN_KINDS}

    def samples(self, n: int) -> dict[str, list[str]]:
        def tid(x: Any) -> str:
            return x if isinstance(x, str) else str(x.get("track_id"))

        return {k: [tid(x) for x in getattr(self, k)[:n]] for k in PLAN_KINDS if k != "unchanged"}


_ROW_COLUMNS = ["track_id", "uri", "metadata_json", "content_version"]
_ERROR_COLUMNS = ["track_id", "uri", "stage", "error_type", "message"]


def plan_of(decided: pa.Table, stored_tracks: int = 0) -> Plan:
    """:func:`pipeline.runs.decide.decide`'s rows as a :class:`Plan` (lists, in row order)."""
    plan = Plan(stored_tracks=stored_tracks, requests=int(pc.sum(decided["requests"]).as_py() or 0))
    for k in PLAN_KINDS:
        t = decided.filter(pc.equal(decided["kind"], k))
        if k in ("unchanged", "removed", "kept"):
            getattr(plan, k).extend(dict.fromkeys(t["track_id"].to_pylist()))
        else:
            getattr(plan, k).extend(
                t.select(_ERROR_COLUMNS if k in ("lookup_failed", "rejected") else _ROW_COLUMNS).to_pylist()
            )
    return plan


def driver_plan(catalog: pa.Table, stored: pa.Table | None, settings_id: str, meta_cols: Sequence[str],
                delete_missing: bool, storage_options: dict | None, threads: int = 32,
                ray_min_rows: int = LOOKUP_RAY_MIN_ROWS, min_per_prefix: int = 2) -> Plan:  # fmt: skip
    """The plan made on the driver: :func:`pipeline.runs.decide.decide` over the whole catalog as
    one partition; the stored rows whose version the catalog does not state get it from the one
    version lookup (:class:`pipeline.runs.decide.LookupGroup`: here, or per parent prefix in a
    Ray map when at least ``ray_min_rows`` of them are left) and are decided again."""
    proj = stored if stored is not None else STORED_SCHEMA.empty_table()
    first = decide(catalog, proj, None, settings_id, meta_cols, delete_missing)
    waiting = pc.equal(first["kind"], "pending")
    pending = first.filter(waiting)
    parts = [first.filter(pc.invert(waiting))]
    if pending.num_rows:
        lookup = LookupGroup(settings_id, meta_cols, storage_options, threads, min_per_prefix)
        if pending.num_rows >= ray_min_rows:
            parts.append(lookup_with_ray(pending, lookup))
        else:
            parts.append(lookup(pending))
    decided = pa.concat_tables(parts).sort_by([("row_key", "ascending")])  # stable: removed rows last
    n_stored = pc.count_distinct(proj["track_id"]).as_py() if proj.num_rows else 0
    return plan_of(decided, n_stored)


def make_plan(rows: Sequence[Mapping[str, Any]], stored: pa.Table | None,
              versions: Mapping[str, str | Mapping[str, Any]], settings_id: str, meta_cols: Sequence[str],
              delete_missing: bool, present_ids: Iterable[str] = ()) -> Plan:  # fmt: skip
    """:func:`pipeline.runs.decide.decide` over rows held in memory with known versions: catalog
    ``rows`` (``track_id``, ``uri``, ``metadata_json``, maybe ``content_version``), the stored
    ``tracks`` columns (``track_id``, ``uri``, ``content_version``, ``settings_id`` and the
    metadata columns), ``versions`` (track_id -> a version, or a mapping with ``content_version``
    or ``error_type``/``message``; a row without one uses its own). ``present_ids``: ids of
    rejected catalog rows (they count as present, never as removed)."""
    n = len(rows)
    extra = list(present_ids)
    catalog = pa.table({
        "row_key": pa.array(range(n + len(extra)), pa.int64()), "row": pa.array(range(n + len(extra)), pa.int64()),
        "track_id": pa.array([r["track_id"] for r in rows] + extra, pa.string()),
        "uri": pa.array([r["uri"] for r in rows] + [None] * len(extra), pa.string()),
        "metadata_json": pa.array([r.get("metadata_json") for r in rows] + [None] * len(extra), pa.string()),
        "content_version": pa.array([r.get("content_version") for r in rows] + [None] * len(extra), pa.string()),
        "error_type": pa.array([None] * n + ["CatalogError"] * len(extra), pa.string()),
        "message": pa.array([None] * n + ["rejected"] * len(extra), pa.string()),
    }, schema=schemas.CATALOG_ROWS_SCHEMA)  # fmt: skip
    vs = [(t, {"content_version": v} if isinstance(v, str) else v) for t, v in versions.items()]
    found = pa.table({"track_id": pa.array([t for t, _ in vs], pa.string()),
                      **{c: pa.array([v.get(c) for _, v in vs], pa.string()) for c in schemas.LOOKUP_SCHEMA.names[1:]}},
                     schema=schemas.LOOKUP_SCHEMA)  # fmt: skip
    proj = stored_projection(stored, meta_cols) if stored is not None else STORED_SCHEMA.empty_table()
    decided = decide(catalog, proj, found, settings_id, meta_cols, delete_missing)
    return plan_of(decided, pc.count_distinct(proj["track_id"]).as_py() if proj.num_rows else 0)


def has_new_tracks(catalog: pa.Table, stored: pa.Table | None) -> bool:
    """Whether some catalog row that stands is not in the store (so it will be embedded)."""
    ids = catalog.filter(pc.is_null(catalog["error_type"]))["track_id"]
    if not len(ids):
        return False
    if stored is None or not stored.num_rows:
        return True
    return not pc.all(pc.is_in(ids, value_set=stored["track_id"].combine_chunks())).as_py()


def read_stored(store: Store) -> tuple[Any, pa.Table | None]:
    """``tracks.lance`` and its projection the plan compares with
    (:func:`pipeline.runs.decide.stored_projection`, the store's metadata columns)."""
    ds = store.open("tracks")
    if ds is None:
        return None, None
    meta = schemas.metadata_columns(ds.schema)
    cols = ["track_id", "uri", "content_version", "settings_id", *meta]
    parts = [stored_projection(b, meta) for b in ds.to_batches(columns=cols, batch_size=1 << 16)]
    return ds, pa.concat_tables(parts) if parts else STORED_SCHEMA.empty_table()


def check_schemas(store: Store, info: ModelInfo, meta_cols: Sequence[str]) -> None:
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
