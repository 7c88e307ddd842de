"""The refresh plan as Ray Data stages: a distributed join of the catalog with the stored tracks.

For catalogs too large for the driver (see :func:`use_ray_plan`). The decision is the driver's
(:func:`pipeline.runs.decide.decide`), run per hash partition where the rows are:

    catalog (pipeline.flow.catalog_rows)  ─┐
                                           ├─ hash(track_id) % P ─ groupby(part) ─▶ PlanPart:
    tracks.lance projection (per fragment) ┘      decide(): duplicate policy, new / changed /
          (track_id, uri, content_version,        settings / metadata / unchanged / removed /
           settings_id, metadata columns)         rejected, and "pending" (stored, no version in
                                                  the catalog)
    pending ─ groupby(parent prefix) ─▶ LookupGroup (pipeline.runs.decide): one LIST per 1,000
          objects (HEADs for lone objects), then decide() again

The plan stays a materialized dataset in the object store (spilled to disk when large); the
driver keeps counts, a few sample ids per kind, one offset per map call (to cut the rows to
embed into chunks), and the error rows.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schemas
from pipeline.flow.catalog_rows import catalog_dataset
from pipeline.flow.runtime import ensure_ray
from pipeline.flow.streaming import chunk_of
from pipeline.io.catalog import open_catalog
from pipeline.io.objects import parent_prefix
from pipeline.io.uris import UriPolicy
from pipeline.runs.decide import (
    DECIDED_SCHEMA,
    PLAN_COLUMNS,
    STORED_FIELDS,
    STORED_SCHEMA,
    TODO_KINDS,
    LookupGroup,
    decide,
    stored_projection,
)
from pipeline.runs.settings import RefreshJob
from pipeline.store.maintenance import (
    MISSING_SAMPLE,
    SWEEP_KEYS,
    Orphans,
    find_orphans,
    hash_buckets,
    orphans_of,
)
from pipeline.store.tables import Store, StoreRef

#: Catalog tables at least this large (bytes) are planned with Ray under ``--planner auto``.
RAY_PLAN_MIN_BYTES = 32 * 1024**2
#: Listings with at least this many top-level sub-prefixes are planned with Ray under ``auto``.
RAY_PLAN_MIN_SUBPREFIXES = 8
#: Target rows per hash partition of the plan.
ROWS_PER_PARTITION = 200_000
#: Rows per block of the materialized plan (the driver keeps an offset per block).
PLAN_ROWS_PER_BLOCK = 100_000

#: The stream the plan's first stage groups: catalog rows (side 0) and stored rows (side 1).
UNION_SCHEMA = pa.schema(
    [("part", pa.int32()), ("side", pa.int8()), *schemas.CATALOG_ROWS_SCHEMA, *STORED_FIELDS]
)


def use_ray_plan(job: RefreshJob) -> bool:
    """``--planner ray``, or ``auto`` for a large catalog: a table of at least
    :data:`RAY_PLAN_MIN_BYTES`, or a listing with at least :data:`RAY_PLAN_MIN_SUBPREFIXES`
    sub-prefixes. A ``--limit`` run (a partial catalog, in catalog order) is planned on the driver."""
    if job.planner == "driver" or job.embed.limit is not None:
        return False
    if job.planner == "ray":
        return True
    src = open_catalog(job.embed.catalog, job.embed.storage_options or None)
    fs = src.fs()
    if src.is_dir:
        try:
            subs = [e for e in fs.ls(src.path, detail=True) if e.get("type") == "directory"]
        except OSError:
            return False
        return len(subs) >= RAY_PLAN_MIN_SUBPREFIXES
    try:
        size = int(fs.size(src.path) or 0)
    except OSError:
        return False
    return size >= RAY_PLAN_MIN_BYTES


def partition_of(ids: pa.Array, fallback: pa.Array, parts: int) -> np.ndarray:
    """Hash partition (0..parts-1) of each track id (:func:`pipeline.store.maintenance.hash_buckets`,
    the sweep's buckets); rows without an id (rejected rows) spread by ``fallback``."""
    h = hash_buckets(ids, parts)
    missing = ids.is_null().to_numpy(zero_copy_only=False)
    if missing.any():
        fb = (fallback.to_numpy(zero_copy_only=False).astype(np.uint64) % np.uint64(parts)).astype(np.int32)
        h = np.where(missing, fb, h)
    return h


def catalog_side(batch: pa.Table, parts: int) -> pa.Table:
    """Catalog rows -> :data:`UNION_SCHEMA` (side 0)."""
    n = batch.num_rows
    cols = {name: batch[name] for name in schemas.CATALOG_ROWS_SCHEMA.names}
    cols["part"] = pa.array(partition_of(batch["track_id"], batch["row_key"], parts), pa.int32())
    cols["side"] = pa.array(np.zeros(n, np.int8))
    for name, typ in STORED_FIELDS:
        cols[name] = pa.nulls(n, typ)
    return pa.table([cols[f.name] for f in UNION_SCHEMA], schema=UNION_SCHEMA)


def fragments_dataset(
    store: Store, name: str, fn: Any, fn_kwargs: dict[str, Any], ds: Any | None = None
) -> Any:
    """A lazy dataset of table ``name`` read fragment by fragment (one task per fragment, at the
    version of ``ds``, the table as the caller opened it, or as open now): ``fn(batches,
    **fn_kwargs)`` turns each fragment's record batches into blocks."""
    import ray

    ds = ds if ds is not None else store.open(name)
    frags = [{"fragment_id": f.fragment_id} for f in ds.get_fragments()]
    kw = {
        "fn": fn,
        "ref": StoreRef(store.root, store.lance_options, name, ds.version),
        "fn_kwargs": fn_kwargs,
    }
    return ray.data.from_items(frags, override_num_blocks=max(1, len(frags))).map_batches(
        _read_fragments, fn_kwargs=kw, batch_size=1, batch_format="pyarrow"
    )


def _read_fragments(batch: pa.Table, fn: Any, ref: StoreRef, fn_kwargs: dict[str, Any]) -> Iterator[pa.Table]:
    ds = ref.open()
    for fid in batch["fragment_id"].to_pylist():
        yield from fn(ds.get_fragment(fid), **fn_kwargs)


def stored_side(fragment: Any, meta_cols: Sequence[str], parts: int) -> Iterator[pa.Table]:
    """The projection of a ``tracks.lance`` fragment (:func:`pipeline.runs.decide.stored_projection`)
    -> :data:`UNION_SCHEMA` (side 1)."""
    cols = ["track_id", "uri", "content_version", "settings_id", *meta_cols]
    for b in fragment.to_batches(columns=cols, batch_size=1 << 16):
        proj = stored_projection(b, meta_cols)
        n = proj.num_rows
        out = {c: proj[c] for c in proj.column_names}
        out["part"] = pa.array(
            partition_of(proj["track_id"], pa.array(np.zeros(n, np.int64)), parts), pa.int32()
        )
        out["side"] = pa.array(np.ones(n, np.int8))
        yield pa.table(
            [out[f.name] if f.name in out else pa.nulls(n, f.type) for f in UNION_SCHEMA],
            schema=UNION_SCHEMA,
        )


def with_prefix(t: pa.Table) -> pa.Table:
    """``t`` with the parent prefix of each row's uri (:func:`pipeline.io.objects.parent_prefix`)."""
    return t.append_column("prefix", pa.array([parent_prefix(u) for u in t["uri"].to_pylist()], pa.string()))


def lookup_pending(pending: Any, lookup: LookupGroup, parts: int) -> Any:
    """The pending rows (a Ray dataset with ``prefix``) grouped by parent prefix, each group
    through ``lookup`` (:class:`pipeline.runs.decide.LookupGroup`): a lazy dataset of plan rows."""
    return pending.groupby("prefix", num_partitions=parts).map_groups(
        LookupGroup,
        fn_constructor_kwargs={
            "settings_id": lookup.settings_id,
            "meta_cols": lookup.meta_cols,
            "storage_options": lookup.storage_options,
            "threads": lookup.threads,
            "min_per_prefix": lookup.min_per_prefix,
        },  # fmt: skip
        batch_format="pyarrow",
    )


def lookup_with_ray(pending: pa.Table, lookup: LookupGroup) -> pa.Table:
    """:func:`lookup_pending` for pending rows the driver holds; their plan rows come back."""
    import ray

    ensure_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = max(1, min(pending.num_rows // 500 + 1, 1000))
    ds = ray.data.from_arrow(with_prefix(pending)).repartition(blocks)
    got = [t for t in ray.get(lookup_pending(ds, lookup, cpus).to_arrow_refs()) if t.num_rows]
    return (
        pa.concat_tables([t.select(DECIDED_SCHEMA.names).cast(DECIDED_SCHEMA) for t in got])
        if got
        else DECIDED_SCHEMA.empty_table()
    )


def number_block(t: pa.Table) -> pa.Table:
    """``map_batches`` function: number the rows to embed of one block: ``group`` (a random 63-bit
    id of the block) and ``seq`` (their position among its rows to embed). The driver keeps one
    offset per block (:func:`_summarized`), never one per row or per prefix."""
    todo = pc.is_in(t["kind"], pa.array(TODO_KINDS, pa.string())).to_numpy(zero_copy_only=False)
    seq = np.cumsum(todo) - 1
    t = t.set_column(
        t.schema.get_field_index("group"),
        "group",
        pa.array(np.full(t.num_rows, uuid.uuid4().int >> 65, np.int64)),
    )
    return t.set_column(
        t.schema.get_field_index("seq"), "seq", pa.array(np.where(todo, seq, 0), pa.int64(), mask=~todo)
    )


class PlanPart:
    """``map_groups`` function of the plan's first stage: every catalog and stored row of one
    hash partition -> its plan rows (:func:`pipeline.runs.decide.decide`; stored rows whose
    version the catalog does not state are ``pending``, with their parent ``prefix``)."""

    def __init__(self, settings_id: str, meta_cols: Sequence[str], delete_missing: bool) -> None:
        self.settings_id, self.meta_cols, self.delete_missing = settings_id, list(meta_cols), delete_missing

    def __call__(self, t: pa.Table) -> pa.Table:
        side = t["side"].to_numpy()
        cat = t.filter(pa.array(side == 0)).select(schemas.CATALOG_ROWS_SCHEMA.names)
        stored = t.filter(pa.array(side == 1)).select(STORED_SCHEMA.names)
        out = decide(cat, stored, None, self.settings_id, self.meta_cols, self.delete_missing)
        pending = pc.equal(out["kind"], "pending").to_numpy(zero_copy_only=False)
        uris = out["uri"].to_pylist()
        prefix = [parent_prefix(u) if p else None for u, p in zip(uris, pending, strict=True)]
        return out.append_column("prefix", pa.array(prefix, pa.string()))


def summarize(batch: pa.Table, sample: int) -> pa.Table:
    """``map_batches`` function: per (group, kind) of a block, the row count, the requests and
    the first ``sample`` track ids (JSON), in the block's order."""
    out: list[dict[str, Any]] = []
    if not batch.num_rows:
        return pa.table({"group": pa.array([], pa.int64()), "kind": pa.array([], pa.string()),
                         "n": pa.array([], pa.int64()), "requests": pa.array([], pa.int64()),
                         "sample": pa.array([], pa.string())})  # fmt: skip
    g = batch["group"].to_numpy()
    kinds = batch["kind"].to_pylist()
    ids = batch["track_id"].to_pylist()
    req = batch["requests"].to_numpy()
    seen: dict[tuple[int, str], dict[str, Any]] = {}
    for i, key in enumerate(zip(g.tolist(), kinds, strict=True)):
        s = seen.get(key)
        if s is None:
            s = seen[key] = {"group": key[0], "kind": key[1], "n": 0, "requests": 0, "ids": []}
            out.append(s)
        s["n"] += 1
        s["requests"] += int(req[i])
        if len(s["ids"]) < sample:
            s["ids"].append(ids[i])
    for s in out:
        s["sample"] = json.dumps(s.pop("ids"))
    return pa.Table.from_pylist(out)


def todo_rows(batch: pa.Table, offsets: dict[int, int], chunk_size: int) -> pa.Table:
    """``map_batches`` function: the rows to embed, with their chunk (from the driver's offsets)."""
    keep = pc.is_in(batch["kind"], pa.array(TODO_KINDS, pa.string()))
    t = batch.filter(keep)
    if not t.num_rows:
        return pa.table({"track_id": pa.array([], pa.string()), "uri": pa.array([], pa.string()),
                         "metadata_json": pa.array([], pa.string()), "content_version": pa.array([], pa.string()),
                         "chunk": pa.array([], pa.int64())})  # fmt: skip
    off = np.array([offsets[g] for g in t["group"].to_pylist()], np.int64)
    chunk = chunk_of(off + t["seq"].to_numpy(), chunk_size)
    return t.select(["track_id", "uri", "metadata_json", "content_version"]).append_column(
        "chunk", pa.array(chunk, pa.int64())
    )


def of_kinds(batch: pa.Table, kinds: Sequence[str]) -> pa.Table:
    """``map_batches`` function: the rows of these kinds."""
    return batch.filter(pc.is_in(batch["kind"], pa.array(list(kinds), pa.string())))


@dataclass
class RayPlan:
    """A plan made by :func:`ray_plan`: counts per kind, samples, and the rows as a dataset."""

    ds: Any  # materialized ray Dataset of plan rows (PLAN_COLUMNS)
    counts: dict[str, int]
    samples: dict[str, list[str]]
    stored_tracks: int
    tracks_total: int
    requests: int
    catalog_meta: list[str]
    offsets: dict[int, int] = field(default_factory=dict)  # group -> first position among rows to embed
    todo_count: int = 0
    stage_s: dict[str, float] = field(default_factory=dict)  # seconds per step of the plan

    def rows(self, kinds: Sequence[str], batch_rows: int = 10_000) -> Iterator[list[dict[str, Any]]]:
        """The plan rows of these kinds, ``batch_rows`` at a time (never all at once)."""
        sub = self.ds.map_batches(
            of_kinds, fn_kwargs={"kinds": list(kinds)}, batch_size=None, batch_format="pyarrow"
        )
        for b in sub.iter_batches(batch_size=batch_rows, batch_format="pyarrow"):
            if b.num_rows:
                yield b.to_pylist()

    def todo(self, chunk_size: int) -> Any:
        """The rows to embed (``track_id``, ``uri``, ``metadata_json``, ``content_version``,
        ``chunk``) as a lazy dataset; chunk ``k`` holds positions ``k*chunk_size ...``."""
        return self.ds.map_batches(todo_rows, fn_kwargs={"offsets": self.offsets, "chunk_size": chunk_size},
                                   batch_size=None, batch_format="pyarrow")  # fmt: skip


def catalog_meta_columns(cat: Any) -> list[str]:
    """Metadata column names of the catalog rows, in the order they first appear."""

    def keys(batch: pa.Table) -> pa.Table:
        first: dict[str, int] = {}
        for key, text in zip(batch["row_key"].to_pylist(), batch["metadata_json"].to_pylist(), strict=True):
            if text:
                for k in json.loads(text):
                    first.setdefault(k, key)
        return pa.table(
            {"key": pa.array(list(first), pa.string()), "row_key": pa.array(list(first.values()), pa.int64())}
        )

    got = cat.map_batches(keys, batch_size=None, batch_format="pyarrow").take_all()
    first: dict[str, int] = {}
    for r in got:
        first[r["key"]] = min(first.get(r["key"], r["row_key"]), r["row_key"])
    return sorted(first, key=first.__getitem__)


def ray_plan(
    job: RefreshJob,
    store: Store | None,
    settings_id: str,
    meta_cols: Sequence[str] | None,
    delete_missing: bool,
    policy: UriPolicy,
) -> RayPlan:
    """Plan a refresh with Ray (see the module docstring). ``meta_cols``: the store's metadata
    columns (``None``: no store yet: the catalog's, :attr:`RayPlan.catalog_meta`, are compared)."""
    import time

    import ray

    ensure_ray()
    t0 = time.perf_counter()
    stage_s: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal t0
        stage_s[name] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()

    ej = job.embed
    src = open_catalog(ej.catalog, ej.storage_options or None)
    cat = catalog_dataset(src, policy, ej.max_row_chars).materialize()
    lap("plan_catalog")
    n_cat = cat.count()
    catalog_meta = catalog_meta_columns(cat)
    compared = catalog_meta if meta_cols is None else list(meta_cols)
    tracks = store.open("tracks") if store is not None else None
    n_stored = tracks.count_rows() if tracks is not None else 0
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    parts = max(cpus, -(-(n_cat + n_stored) // ROWS_PER_PARTITION))
    union = cat.map_batches(catalog_side, fn_kwargs={"parts": parts}, batch_size=None, batch_format="pyarrow")
    if tracks is not None and n_stored:
        stored = fragments_dataset(
            store, "tracks", stored_side, {"meta_cols": list(meta_cols or []), "parts": parts}, tracks
        )
        union = union.union(stored)
    first = (
        union.groupby("part", num_partitions=parts)
        .map_groups(
            PlanPart,
            fn_constructor_kwargs={
                "settings_id": settings_id,
                "meta_cols": compared,
                "delete_missing": delete_missing,
            },  # fmt: skip
            batch_format="pyarrow",
        )
        .materialize()
    )
    lap("plan_join")
    plan = first.map_batches(lambda b: of_kinds(b, [k for k in _ALL_KINDS if k != "pending"]).select(PLAN_COLUMNS),
                             batch_size=None, batch_format="pyarrow")  # fmt: skip
    pending = _nonempty(
        first.map_batches(of_kinds, fn_kwargs={"kinds": ["pending"]}, batch_size=None, batch_format="pyarrow")
    )
    if pending is not None:
        lookup = LookupGroup(settings_id, compared, ej.storage_options or None, job.lookup_threads)
        looked = lookup_pending(pending, lookup, parts)
        plan = plan.union(
            looked.map_batches(lambda b: b.select(PLAN_COLUMNS), batch_size=None, batch_format="pyarrow")
        )
    plan_ds = (
        plan.repartition(target_num_rows_per_block=PLAN_ROWS_PER_BLOCK)
        .map_batches(number_block, batch_size=None, batch_format="pyarrow")
        .materialize()
    )
    lap("plan_lookup")
    del cat, first
    out = _summarized(plan_ds, job.sample, n_stored, n_cat, catalog_meta)
    lap("plan_summary")
    out.stage_s = stage_s
    return out


def _nonempty(ds: Any) -> Any:
    """``ds`` materialized without its empty blocks (``None`` if it has no rows). ``map_groups``
    emits a column-less block for an empty partition, which a later hash shuffle cannot concatenate
    with the others; only the row counts come to the driver."""
    import ray

    @ray.remote(num_cpus=0)
    def rows(block: pa.Table) -> int:
        return block.num_rows

    refs = ds.materialize().to_arrow_refs()
    counts = ray.get([rows.remote(r) for r in refs])
    keep = [r for r, n in zip(refs, counts, strict=True) if n]
    return ray.data.from_arrow_refs(keep) if keep else None


_ALL_KINDS = ("new", "changed", "settings", "metadata", "unchanged", "removed", "kept", "lookup_failed",
              "rejected", "pending")  # fmt: skip


def _summarized(plan_ds: Any, sample: int, n_stored: int, n_cat: int, catalog_meta: list[str]) -> RayPlan:
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # groups in the order the todo pass will see them
    try:
        rows = plan_ds.map_batches(summarize, fn_kwargs={"sample": sample}, batch_size=None,
                                   batch_format="pyarrow").take_all()  # fmt: skip
    finally:
        ctx.execution_options.preserve_order = before
    counts = dict.fromkeys(_ALL_KINDS[:-1], 0)
    samples: dict[str, list[str]] = {k: [] for k in counts if k != "unchanged"}
    offsets: dict[int, int] = {}
    requests = todo = 0
    for r in rows:
        counts[r["kind"]] += r["n"]
        requests += r["requests"]
        if r["kind"] in samples and len(samples[r["kind"]]) < sample:
            samples[r["kind"]] += json.loads(r["sample"])[: sample - len(samples[r["kind"]])]
        if r["kind"] in TODO_KINDS:
            if r["group"] not in offsets:
                offsets[r["group"]] = todo
            todo += r["n"]
    return RayPlan(plan_ds, counts, samples, n_stored, n_cat, requests, catalog_meta, offsets, todo)


# --------------------------------------------------------------------------- the orphan sweep, in Ray


def _sweep_side(fragment: Any, side: int, parts: int) -> Iterator[pa.Table]:
    """``(track_id, run_id)`` keys of a fragment (windows: distinct per batch), with part and side."""
    for b in fragment.to_batches(columns=SWEEP_KEYS, batch_size=1 << 16):
        t = pa.Table.from_batches([b])
        if side:
            t = t.group_by(SWEEP_KEYS).aggregate([])
        n = t.num_rows
        ids = t["track_id"].combine_chunks()
        part = partition_of(ids, pa.array(np.zeros(n, np.int64)), parts)
        yield t.append_column("part", pa.array(part, pa.int32())).append_column(
            "side", pa.array(np.full(n, side, np.int8))
        )


def sweep_part(t: pa.Table) -> pa.Table:
    """``map_groups`` function: :func:`pipeline.store.maintenance.orphans_of` one hash partition:
    its windows keys no track row points at (``orphan``), a sample of the track rows without
    windows (``missing``) and their count (``missing_count``)."""
    side = t["side"].to_numpy()
    orphans, missing = orphans_of(t.filter(pa.array(side == 0)), t.filter(pa.array(side == 1)))
    sample = missing.slice(0, MISSING_SAMPLE)  # the driver gets a sample and the count, not every id

    def tagged(t: pa.Table, kind: str, n: int) -> pa.Table:
        t = t.append_column("kind", pa.array([kind] * t.num_rows, pa.string()))
        return t.append_column("n", pa.array(np.full(t.num_rows, n, np.int64)))

    count = pa.table({"track_id": [None], "run_id": [None], "kind": ["missing_count"], "n": [missing.num_rows]},
                     schema=pa.schema([("track_id", pa.string()), ("run_id", pa.string()), ("kind", pa.string()),
                                       ("n", pa.int64())]))  # fmt: skip
    return pa.concat_tables([tagged(orphans, "orphan", 1), tagged(sample, "missing", 0), count])


def find_orphans_ray(store: Store) -> Orphans:
    """:func:`pipeline.store.maintenance.find_orphans` as a distributed anti-join of the windows
    keys with the tracks keys: only the orphans (a killed run's chunks in flight, at most) and
    the missing tracks' count and sample come to the driver."""
    import ray

    tracks, windows = store.open("tracks"), store.open("windows")
    if tracks is None:
        return find_orphans(store)  # no track rows: every windows row is an orphan, found by run
    ensure_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    parts = max(cpus, -(-tracks.count_rows() // ROWS_PER_PARTITION))
    union = fragments_dataset(store, "tracks", _sweep_side, {"side": 0, "parts": parts}, tracks)
    if windows is not None:
        union = union.union(
            fragments_dataset(store, "windows", _sweep_side, {"side": 1, "parts": parts}, windows)
        )
    found = union.groupby("part", num_partitions=parts).map_groups(sweep_part, batch_format="pyarrow")
    out = Orphans()
    for b in found.iter_batches(batch_size=10_000, batch_format="pyarrow"):
        if "kind" not in b.column_names or not b.num_rows:  # an empty partition's column-less block
            continue
        out.add_missing(b.filter(pc.equal(b["kind"], "missing"))["track_id"].to_pylist(), 0)
        out.n_missing += int(pc.sum(b.filter(pc.equal(b["kind"], "missing_count"))["n"]).as_py() or 0)
        out.add_orphans(b.filter(pc.equal(b["kind"], "orphan")))
    return out
