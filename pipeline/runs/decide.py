"""The refresh decision, written once: :func:`decide` over Arrow tables, and the version lookup.

:func:`decide` takes a catalog part (:data:`pipeline.schemas.CATALOG_ROWS_SCHEMA`: every row of
the ids it holds, rejected rows included), the stored projection of those ids
(:data:`STORED_SCHEMA`, :func:`stored_projection`) and, where known, their object versions
(:data:`pipeline.schemas.LOOKUP_SCHEMA`), and returns one plan row per catalog row and per stored
track the catalog lacks (:data:`DECIDED_SCHEMA`). It is the only place where a track is found
new, changed (content or uri), of other settings, retitled (``metadata``), unchanged, removed
(or ``kept``), unreadable (``lookup_failed``), a duplicate id or refused (``rejected``).

Both planners run it: the driver's (:func:`pipeline.runs.plan.driver_plan`) on the whole catalog
as one partition, the Ray planner (:mod:`pipeline.runs.ray_plan`) per hash partition of
``track_id`` (``map_groups``). A stored row whose version the catalog does not state is
``pending`` when no versions are given; :class:`LookupGroup` (the one version lookup: a LIST per
parent prefix, a HEAD for a lone object) finds the versions of the pending rows of some parent
prefixes and runs :func:`decide` again on them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schemas
from pipeline.errors import error_type, redact
from pipeline.io.catalog import FirstRowWins
from pipeline.io.objects import object_versions

#: Plan kinds, in report order.
PLAN_KINDS = ("new", "changed", "settings", "metadata", "unchanged", "removed", "kept", "lookup_failed",
              "rejected")  # fmt: skip
#: Plan kinds whose rows are embedded.
TODO_KINDS = ("new", "changed", "settings")

#: The stored values compared with each catalog row (``s_`` for stored).
STORED_COLUMNS = ("s_uri", "s_content_version", "s_settings_id", "s_meta_json")
STORED_FIELDS = [(c, pa.string()) for c in STORED_COLUMNS]
#: The stored projection :func:`decide` compares with: the metadata columns as JSON text.
STORED_SCHEMA = pa.schema([("track_id", pa.string()), *STORED_FIELDS])
#: What :func:`decide` returns: plan rows, the object-store ``requests`` made for them, the
#: catalog order (``row_key``) and, for ``pending`` rows only, the stored values.
DECIDED_SCHEMA = pa.schema(
    [*schemas.PLAN_ROWS_SCHEMA, ("requests", pa.int64()), ("row_key", pa.int64()), *STORED_FIELDS]
)
#: Columns of a plan row as the planners keep it.
PLAN_COLUMNS = [*schemas.PLAN_ROWS_SCHEMA.names, "requests"]


def stored_projection(tracks: pa.Table | pa.RecordBatch, meta_cols: Sequence[str]) -> pa.Table:
    """``tracks.lance`` rows (``track_id``, ``uri``, ``content_version``, ``settings_id`` and the
    ``meta_cols``) -> :data:`STORED_SCHEMA` (the metadata as JSON text, absent columns null)."""
    n = tracks.num_rows
    names = tracks.schema.names
    meta = {m: tracks.column(m).to_pylist() if m in names else [None] * n for m in meta_cols}
    meta_json = [json.dumps({m: v[i] for m, v in meta.items()}) for i in range(n)]
    cols = [tracks.column("track_id"), tracks.column("uri"), tracks.column("content_version"),
            tracks.column("settings_id"), pa.array(meta_json, pa.string())]  # fmt: skip
    cols = [c.cast(pa.string()) if not pa.types.is_string(c.type) else c for c in cols]
    return pa.Table.from_arrays(cols, schema=STORED_SCHEMA)


def decide(catalog: pa.Table, stored: pa.Table, versions: pa.Table | None, settings_id: str,
           meta_cols: Sequence[str], delete_missing: bool) -> pa.Table:  # fmt: skip
    """The plan rows of a catalog part (see the module docstring), in catalog order, then the
    stored tracks it lacks (``removed``, or ``kept`` without ``delete_missing``).

    Args:
        catalog: :data:`pipeline.schemas.CATALOG_ROWS_SCHEMA` rows; a row with ``error_type``
            is rejected (its id counts as present: never removed).
        stored: :data:`STORED_SCHEMA` rows of the stored tracks of these ids.
        versions: looked-up versions (:data:`pipeline.schemas.LOOKUP_SCHEMA`); ``None``: none
            looked up yet, a stored row whose version the catalog does not state is ``pending``.
            A row without a version either way is ``lookup_failed``.
        settings_id: the fingerprint of these settings.
        meta_cols: the metadata columns compared (``metadata``: only they differ).
        delete_missing: stored ids absent from the catalog are ``removed`` (else ``kept``).
    """
    cat = catalog.sort_by("row_key")
    bad = _bools(cat["error_type"].is_valid())
    valid = cat.filter(pa.array(~bad))
    policy = FirstRowWins()  # the duplicate-id policy: every row of an id is in this part
    dup = [
        policy.check(t, r)
        for t, r in zip(valid["track_id"].to_pylist(), valid["row"].to_pylist(), strict=True)
    ]
    is_dup = np.array([d is not None for d in dup], dtype=bool)
    win = valid.filter(pa.array(~is_dup))
    refused = cat.filter(pa.array(bad))
    if is_dup.any():
        found = [d for d in dup if d is not None]
        dups = valid.filter(pa.array(is_dup))
        dups = _with(dups, uri=pa.array([redact(u) for u in dups["uri"].to_pylist()], pa.string()),
                     error_type=pa.array([error_type(d) for d in found], pa.string()),
                     message=pa.array([str(d) for d in found], pa.string()))  # fmt: skip
        refused = pa.concat_tables([refused, dups]).sort_by("row_key")
    parts = [_kinds(win, stored, versions, settings_id, meta_cols)]
    if refused.num_rows:
        parts.append(_rows(refused, np.full(refused.num_rows, "rejected", object), stage="catalog"))
    present = pa.concat_arrays([win["track_id"].combine_chunks(), refused["track_id"].combine_chunks()])
    gone = stored.filter(pc.invert(pc.is_in(stored["track_id"], value_set=present)))
    if gone.num_rows:
        gone = gone.append_column("uri", gone["s_uri"])
        parts.append(_rows(gone, np.full(gone.num_rows, "removed" if delete_missing else "kept", object)))
    return pa.concat_tables(parts)


def _bools(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array as numpy."""
    a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    return a.to_numpy(zero_copy_only=False).astype(bool)


def _with(t: pa.Table, **cols: Any) -> pa.Table:
    """``t`` with these columns replaced."""
    for name, values in cols.items():
        t = t.set_column(t.schema.get_field_index(name), name, values)
    return t


def _kinds(win: pa.Table, stored: pa.Table, versions: pa.Table | None, settings_id: str,
           meta_cols: Sequence[str]) -> pa.Table:  # fmt: skip
    """The plan rows of the catalog rows that stand (one per id), compared with the stored values."""
    n = win.num_rows
    pos = pc.index_in(win["track_id"], value_set=stored["track_id"])
    is_stored = _bools(pos.is_valid())
    for c in STORED_COLUMNS:  # the stored values beside each catalog row (null where not stored)
        win = win.append_column(c, stored[c].take(pos))
    cv = win["content_version"]
    found_err = found_msg = None
    failed = np.zeros(n, dtype=bool)
    if versions is not None and versions.num_rows:
        vpos = pc.index_in(win["track_id"], value_set=versions["track_id"])
        cv = pc.coalesce(versions["content_version"].take(vpos), cv)
        found_err, found_msg = versions["error_type"].take(vpos), versions["message"].take(vpos)
        failed = _bools(found_err.is_valid())
        win = _with(win, content_version=cv)
    no_cv = _bools(cv.is_null())

    def differs(a: Any, b: Any) -> np.ndarray:
        return ~_bools(pc.fill_null(pc.equal(a, b), False))

    kind = np.full(n, "unchanged", dtype=object)
    kind[differs(win["s_settings_id"], pa.scalar(settings_id, pa.string()))] = "settings"
    kind[differs(cv, win["s_content_version"]) | differs(win["uri"], win["s_uri"])] = "changed"
    if meta_cols:  # metadata: equal JSON text is equal; other rows compared as objects
        same = (kind == "unchanged") & is_stored & ~no_cv & ~failed
        for i in np.flatnonzero(same & differs(win["metadata_json"], win["s_meta_json"])):
            meta = json.loads(win["metadata_json"][i].as_py() or "{}")
            have = json.loads(win["s_meta_json"][i].as_py() or "{}")
            if any(meta.get(m) != have.get(m) for m in meta_cols):
                kind[i] = "metadata"
    kind[no_cv & is_stored] = "pending" if versions is None else "lookup_failed"
    kind[failed] = "lookup_failed"
    kind[~is_stored & ~failed] = "new"  # new whatever its version: the fetch records it
    bad = kind == "lookup_failed"
    err = pa.array(np.where(bad, "FetchError", None), pa.string())
    msg = pa.array(np.where(bad, "no content version", None), pa.string())
    if found_err is not None:
        err, msg = pc.coalesce(found_err, err), pc.coalesce(found_msg, msg)
    return _rows(win, kind, stage="lookup", err=err, message=msg, failed=bad, keep=kind == "pending")


def _rows(t: pa.Table, kind: np.ndarray, stage: str | None = None, err: Any = None, message: Any = None,
          failed: np.ndarray | None = None, keep: np.ndarray | None = None) -> pa.Table:  # fmt: skip
    """Rows of ``t`` as :data:`DECIDED_SCHEMA` rows of these kinds; ``stage`` (where ``failed``,
    else everywhere), ``err`` (the error type) and ``message`` (where not null) replace the row's; the
    stored values stay only where ``keep``."""
    n = t.num_rows
    names = t.column_names

    def own(name: str, typ: pa.DataType = pa.string()) -> Any:
        return t[name] if name in names else pa.nulls(n, typ)

    where = np.ones(n, bool) if failed is None else failed
    stages = pa.array(np.where(where, stage, None), pa.string()) if stage is not None else None
    cols: dict[str, Any] = {
        "kind": pa.array(kind.tolist(), pa.string()),
        "track_id": t["track_id"],
        "uri": t["uri"],
        "metadata_json": own("metadata_json"),
        "content_version": own("content_version"),
        "stage": own("stage") if stages is None else pc.coalesce(stages, own("stage")),
        "error_type": own("error_type") if err is None else pc.coalesce(err, own("error_type")),
        "message": own("message") if message is None else pc.coalesce(message, own("message")),
        "group": pa.nulls(n, pa.int64()),
        "seq": pa.nulls(n, pa.int64()),
        "requests": pa.array(np.zeros(n, np.int64)),
        "row_key": own("row_key", pa.int64()),
    }
    mask = pa.array(keep if keep is not None else np.zeros(n, bool))
    for c in STORED_COLUMNS:
        cols[c] = pc.if_else(mask, own(c), pa.scalar(None, pa.string()))
    arrays = [
        c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
        for c in (cols[f.name] for f in DECIDED_SCHEMA)
    ]
    return pa.Table.from_arrays(arrays, schema=DECIDED_SCHEMA)


def pending_inputs(pending: pa.Table) -> tuple[pa.Table, pa.Table]:
    """``pending`` plan rows (:data:`DECIDED_SCHEMA`) -> the catalog part and stored projection
    :func:`decide` takes, to decide them again once their versions are known."""
    n = pending.num_rows
    cat = {f.name: pending[f.name] if f.name in pending.column_names else pa.nulls(n, f.type)
           for f in schemas.CATALOG_ROWS_SCHEMA}  # fmt: skip
    cat["row"] = pending["row_key"]
    for c in ("error_type", "message"):
        cat[c] = pa.nulls(n, pa.string())
    catalog = pa.table(cat, schema=schemas.CATALOG_ROWS_SCHEMA)
    return catalog, pending.select(STORED_SCHEMA.names)


def lookup_versions(rows: pa.Table, storage_options: dict | None, threads: int,
                    min_per_prefix: int = 2) -> tuple[pa.Table, int]:  # fmt: skip
    """The one version lookup: the ``content_version`` of the objects of ``rows`` (``track_id``,
    ``uri``) from object metadata (:func:`pipeline.io.objects.object_versions`: a parent prefix
    holding at least ``min_per_prefix`` of them is listed, one LIST per 1,000 objects; the others
    get a HEAD each), as :data:`pipeline.schemas.LOOKUP_SCHEMA` rows (an unreadable object: an
    error), and the requests made."""
    ids, uris = rows["track_id"].to_pylist(), rows["uri"].to_pylist()
    found = object_versions(uris, storage_options, min_per_prefix=min_per_prefix, threads=threads, head=True)
    errors = [found.errors.get(u, (None, None)) if u not in found.versions else (None, None) for u in uris]
    out = pa.table({"track_id": pa.array(ids, pa.string()),
                    "content_version": pa.array([found.versions.get(u) for u in uris], pa.string()),
                    "error_type": pa.array([e[0] for e in errors], pa.string()),
                    "message": pa.array([e[1] for e in errors], pa.string())}, schema=schemas.LOOKUP_SCHEMA)  # fmt: skip
    return out, found.lists + found.heads


class LookupGroup:
    """The pending rows of some parent prefixes (all of a prefix's rows together) -> their
    versions (:func:`lookup_versions`) and their plan rows (:func:`decide`); the requests made
    are on the first row. A ``map_groups`` function of the Ray planner, called directly by the
    driver's."""

    def __init__(self, settings_id: str, meta_cols: Sequence[str], storage_options: dict | None,
                 threads: int, min_per_prefix: int = 2) -> None:  # fmt: skip
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.settings_id, self.meta_cols = settings_id, list(meta_cols)
        self.storage_options, self.threads, self.min_per_prefix = storage_options, threads, min_per_prefix

    def __call__(self, t: pa.Table) -> pa.Table:
        if not t.num_rows:
            return DECIDED_SCHEMA.empty_table()
        versions, requests = lookup_versions(t, self.storage_options, self.threads, self.min_per_prefix)
        catalog, stored = pending_inputs(t)
        out = decide(catalog, stored, versions, self.settings_id, self.meta_cols, delete_missing=False)
        # in the order the rows came (one row per id): the order of the rows to embed, hence of
        # the chunks, the Ray planner has always had
        out = out.take(pc.sort_indices(pc.index_in(out["track_id"], value_set=t["track_id"])))
        req = np.zeros(out.num_rows, np.int64)
        req[0] = requests
        return _with(out, requests=pa.array(req))
