"""The refresh plan: the catalog rows, their object versions, and what to do with each track
(new, changed, settings, metadata, unchanged, removed, ...) compared with the store."""

from __future__ import annotations

import concurrent.futures as cf
import json
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.errors import RefreshError, error_type, one_line, redact
from pipeline.flow.runtime import ensure_ray
from pipeline.io.catalog import RejectedRow, read_catalog
from pipeline.io.objects import content_version, object_versions
from pipeline.io.uris import UriPolicy
from pipeline.runs.model_info import ModelInfo
from pipeline.runs.settings import LOOKUP_RAY_MIN_ROWS, EmbedJob
from pipeline.store.tables import StoreWriter


def catalog_rows(job: EmbedJob) -> tuple[list[dict[str, Any]], list[RejectedRow], list[str]]:
    policy = (
        UriPolicy.for_catalog(job.catalog, job.allowed_prefixes)
        if not job.allowed_prefixes
        else UriPolicy(allowed_prefixes=tuple(job.allowed_prefixes))
    )
    entries, rejected = read_catalog(
        job.catalog,
        job.storage_options or None,
        limit=job.limit,
        policy=policy,
        max_row_chars=job.max_row_chars,
    )
    meta_cols: list[str] = []
    for e in entries:
        for k in e.metadata:
            if k not in meta_cols:
                meta_cols.append(k)
    rows = [{"track_id": e.track_id, "uri": e.uri, "metadata_json": json.dumps(e.metadata)} for e in entries]
    if any(e.content_version is not None for e in entries):  # the catalog states versions
        for r, e in zip(rows, entries, strict=True):
            r["content_version"] = e.content_version
    return rows, rejected, meta_cols


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
    """Result of :func:`lookup_versions`: ``by_id`` maps track_id to ``{content_version,
    error_type, message}``; ``requests`` counts the object-store requests made (LIST pages +
    HEADs; 0 when the catalog states every version needed)."""

    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: int = 0
    from_catalog: int = 0
    listed_prefixes: int = 0
    heads: int = 0


def lookup_versions(
    rows: Sequence[Mapping[str, Any]],
    storage_options: dict | None,
    threads: int = 32,
    ray_min_rows: int = LOOKUP_RAY_MIN_ROWS,
    stored_ids: Container[str] | None = None,
    min_per_prefix: int = 2,
) -> Versions:
    """The ``content_version`` of the catalog rows that need one, with as few requests as possible:

    1. rows whose track_id is not in ``stored_ids`` need none (they are new whatever their
       version; the fetch records it). ``stored_ids=None`` looks up every row;
    2. a version the catalog states (``content_version`` in the row, from the catalog's version
       columns: :func:`pipeline.io.catalog.catalog_version`) is trusted: no request;
    3. the rest: their parent prefixes are listed (:func:`pipeline.io.objects.object_versions`,
       one LIST per 1,000 objects), and only uris no listing covers get a HEAD each: a thread
       pool here, or a Ray map (blocks of 500 rows, each with its own thread pool) when at least
       ``ray_min_rows`` of them are left.
    """
    out = Versions()
    need: list[Mapping[str, Any]] = []
    for r in rows:
        if stored_ids is not None and r["track_id"] not in stored_ids:
            continue
        cv = r.get("content_version")
        if cv is not None:
            out.by_id[r["track_id"]] = {"track_id": r["track_id"], "content_version": cv,
                                        "error_type": None, "message": None}  # fmt: skip
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
            out.by_id[tid] = {
                "track_id": tid,
                "content_version": found.versions[uri],
                "error_type": None,
                "message": None,
            }
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


def make_plan(
    rows: Sequence[Mapping[str, Any]],
    stored: pa.Table | None,
    versions: Mapping[str, Mapping[str, Any]],
    settings_id: str,
    meta_cols: Sequence[str],
    delete_missing: bool,
    present_ids: Iterable[str] = (),
) -> Plan:
    """Compare catalog ``rows`` (track_id, uri, metadata_json) with the ``stored`` track rows
    (track_id, uri, content_version, settings_id and the metadata columns).

    ``versions`` maps track_id to its looked-up ``content_version`` (or error); a row not stored
    needs none (it is new; its ``content_version`` is the catalog's or ``None``). ``present_ids``
    are ids of catalog rows that were rejected: they count as present, never as removed.
    """
    plan = Plan()
    by_id: dict[str, dict[str, Any]] = {}
    if stored is not None and stored.num_rows:
        by_id = {r["track_id"]: r for r in stored.to_pylist()}
    plan.stored_tracks = len(by_id)
    seen = set(present_ids)
    for r in rows:
        tid = r["track_id"]
        seen.add(tid)
        v = versions.get(tid) or {}
        cur = by_id.get(tid)
        if cur is None and not v.get("error_type"):  # new whatever its version: the fetch records it
            plan.new.append({**r, "content_version": v.get("content_version", r.get("content_version"))})
            continue
        if v.get("content_version") is None:
            plan.lookup_failed.append({"track_id": tid, "uri": r["uri"], "stage": "lookup",
                                       "error_type": v.get("error_type") or "FetchError",
                                       "message": v.get("message") or "no content version"})  # fmt: skip
            continue
        row = {**r, "content_version": v["content_version"]}
        if cur is None:
            plan.new.append(row)
        elif cur.get("content_version") != v["content_version"] or cur.get("uri") != r["uri"]:
            plan.changed.append(row)
        elif cur.get("settings_id") != settings_id:
            plan.settings.append(row)
        else:
            meta = json.loads(r.get("metadata_json") or "{}")
            if any(meta.get(m) != cur.get(m) for m in meta_cols):
                plan.metadata.append({"row": row, "stored": cur})
            else:
                plan.unchanged.append(tid)
    for tid in by_id:
        if tid not in seen:
            (plan.removed if delete_missing else plan.kept).append(tid)
    return plan


def read_stored(store: StoreWriter) -> tuple[Any, pa.Table | None]:
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
    return ds, ds.to_table(columns=cols)


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
        if not got.equals(want, check_metadata=False):
            have = [f"{f.name}:{f.type}" for f in got if schemas.parse_layer_column(f.name) is not None]
            need = [f"{f.name}:{f.type}" for f in want if schemas.parse_layer_column(f.name) is not None]
            raise RefreshError(
                f"{name}.lance has vector columns {have} but these settings produce {need}: a refresh "
                "cannot change layers or the model size in place; rebuild with embed_catalog (or refresh "
                "into a new store)"
            )
