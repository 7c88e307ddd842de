"""Store upkeep after a run: the orphan sweep of the commit protocol, index optimisation,
compaction and removal of old versions."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.faults import failpoint
from pipeline.schemas import LOCK_TABLE
from pipeline.store.commits import delete_rows, retry_write
from pipeline.store.lease import StoreLock
from pipeline.store.tables import Store, in_lists, sql_str

#: Tracks per bucket of the sweep: the driver holds one bucket's keys at a time.
SWEEP_BUCKET_ROWS = 1_000_000
#: Ids of tracks without windows the sweep returns at most (it counts them all).
MISSING_SAMPLE = 1000


def hash_buckets(ids: pa.Array | pa.ChunkedArray, n: int) -> Any:
    """A stable hash bucket (0..n-1, numpy int32) of each string id (nulls: bucket 0)."""
    import numpy as np
    import pandas as pd

    values = ids.to_numpy(zero_copy_only=False) if not isinstance(ids, np.ndarray) else ids
    values = np.where(pd.isna(values), "", values).astype(object)
    return (pd.util.hash_array(values) % np.uint64(max(1, n))).astype(np.int32)


def _keys_in_bucket(ds: Any, keys: list[str], bucket: int, buckets: int) -> Any:
    """The ``keys`` columns of ``ds``, streamed, keeping the rows of one hash bucket of track_id."""
    for batch in ds.to_batches(columns=keys):
        if buckets > 1:
            batch = batch.filter(pa.array(hash_buckets(batch.column("track_id"), buckets) == bucket))
        if batch.num_rows:
            yield batch


#: The key of a track's windows: a windows/frames row is kept while a tracks row has its key.
SWEEP_KEYS = ["track_id", "run_id"]


def orphans_of(tracks: pa.Table, windows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The one orphan rule, over the ``(track_id, run_id)`` keys of some track ids' ``tracks``
    and ``windows`` rows: the windows keys no track row has (orphans, distinct) and the track
    keys without windows (missing). :func:`find_orphans` applies it per hash bucket, the Ray
    sweep (:func:`pipeline.runs.ray_plan.find_orphans_ray`) per hash partition."""
    tracks, windows = tracks.select(SWEEP_KEYS), windows.select(SWEEP_KEYS).group_by(SWEEP_KEYS).aggregate([])
    orphans = windows.join(tracks, keys=SWEEP_KEYS, join_type="left anti")
    return orphans, tracks.join(windows, keys=SWEEP_KEYS, join_type="left anti")


@dataclass
class Orphans:
    """What :func:`find_orphans` found: ``by_run`` (run_id -> track ids) of the windows/frames
    rows no ``tracks`` row points at, and the tracks whose windows are missing (never expected:
    reported, see docs/refresh.md): their count and at most :data:`MISSING_SAMPLE` ids."""

    by_run: dict[str, set[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    n_missing: int = 0

    def add_missing(self, ids: list[str], n: int) -> None:
        self.n_missing += n
        if len(self.missing) < MISSING_SAMPLE:
            self.missing += ids[: MISSING_SAMPLE - len(self.missing)]

    def add_orphans(self, keys: pa.Table) -> None:
        for tid, rid in zip(keys["track_id"].to_pylist(), keys["run_id"].to_pylist(), strict=True):
            self.by_run.setdefault(rid, set()).add(tid)


def find_orphans(store: Store) -> Orphans:
    """:func:`orphans_of` the ``(track_id, run_id)`` keys of ``windows`` and ``tracks``.

    Only the key columns are scanned (streamed, the windows keys made distinct per batch), one
    hash bucket of track ids at a time (:data:`SWEEP_BUCKET_ROWS` tracks a bucket), so the
    driver's memory does not grow with the store beyond one bucket (distributed for large
    stores: :func:`pipeline.runs.ray_plan.find_orphans_ray`). Frames need no scan: a frames row
    is written after, and deleted before, the windows row of the same ``(track_id, run_id)``, so
    orphan frames always have orphan windows.
    """
    windows = store.open("windows")
    tracks = store.open("tracks")
    empty = pa.schema([("track_id", pa.string()), ("run_id", pa.string())]).empty_table()
    buckets = max(1, -(-(tracks.count_rows() if tracks is not None else 0) // SWEEP_BUCKET_ROWS))
    out = Orphans()
    for k in range(buckets):
        got = list(_keys_in_bucket(tracks, SWEEP_KEYS, k, buckets)) if tracks is not None else []
        valid = pa.Table.from_batches(got, schema=got[0].schema) if got else empty
        keys = [pa.Table.from_batches([b]).group_by(SWEEP_KEYS).aggregate([]).select(SWEEP_KEYS)
                for b in (_keys_in_bucket(windows, SWEEP_KEYS, k, buckets) if windows is not None else ())]  # fmt: skip
        orphans, lacking = orphans_of(valid, pa.concat_tables(keys) if keys else empty)
        out.add_orphans(orphans)
        out.add_missing(lacking["track_id"].to_pylist()[:MISSING_SAMPLE], lacking.num_rows)
        del valid, keys
    return out


def delete_orphans(
    store: Store, by_run: dict[str, set[str]], lease: StoreLock | None = None
) -> dict[str, int]:
    """Delete the windows and frames rows of these ``(track_id, run_id)`` keys; rows per table."""
    out: dict[str, int] = {}
    for name in ("frames", "windows"):  # frames first: frames rows never outlive their windows rows
        ds = store.open(name)
        if ds is None:
            continue
        n = 0
        for rid, ids in sorted(by_run.items()):
            for pred in in_lists("track_id", sorted(ids)):
                if lease is not None:
                    lease.check()
                n += delete_rows(ds, f"run_id = {sql_str(rid)} AND {pred}")
        out[name] = n
    return out


def sweep(
    store: Store, lease: StoreLock | None = None, found: Orphans | None = None
) -> tuple[dict[str, int], list[str], int]:
    """Delete every windows/frames row whose ``(track_id, run_id)`` is not a ``tracks`` row:
    superseded or orphaned rows a killed run left behind (:func:`find_orphans`, or ``found``).
    Returns the rows deleted per table, the ids of tracks whose windows are missing (at most
    :data:`MISSING_SAMPLE`) and how many there are."""
    found = found if found is not None else find_orphans(store)
    return delete_orphans(store, found.by_run, lease), sorted(found.missing), found.n_missing


def maintain(store: Store, retention_days: float) -> dict[str, Any]:
    """Optimise indices where a table has some, compact small fragments (and fragments with over
    10 % deleted rows), and remove versions older than ``retention_days``; returns what was done
    per table. Indices go first: Lance does not merge indexed with unindexed fragments."""
    out: dict[str, Any] = {}
    for name in (*schemas.TABLES, LOCK_TABLE):
        ds = store.open(name)
        if ds is None:
            continue
        rec: dict[str, Any] = {}
        t0 = time.perf_counter()
        if name != LOCK_TABLE and ds.describe_indices():
            # new rows into the existing indices, no retraining; a retry after a broken connection
            # at worst optimises again
            retry_write(f"index optimisation of {name}", lambda ds=ds: ds.optimize.optimize_indices())
            rec["indices"] = [d.name for d in ds.describe_indices()]
            ds = store.open(name)
        if name != LOCK_TABLE and len(ds.get_fragments()) > 1:
            m = retry_write(  # a compaction whose commit did land is followed by a no-op one
                f"compaction of {name}",
                lambda ds=ds: ds.optimize.compact_files(materialize_deletions_threshold=0.1),
            )
            rec["fragments_removed"], rec["fragments_added"] = (
                int(m.fragments_removed),
                int(m.fragments_added),
            )
            failpoint("maintenance_compacted")
            ds = store.open(name)
        stats = retry_write(  # idempotent
            f"cleanup of {name}",
            # tagged versions (pipeline.store.snapshots: a migration's search pin, kept runs) stay
            lambda ds=ds: ds.cleanup_old_versions(
                older_than=dt.timedelta(days=retention_days), error_if_tagged_old_versions=False
            ),
        )
        rec["old_versions_removed"] = int(getattr(stats, "old_versions", 0))
        rec["bytes_removed"] = int(getattr(stats, "bytes_removed", 0))
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        out[name] = rec
    return out
