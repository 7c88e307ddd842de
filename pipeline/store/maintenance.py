"""Store upkeep after a run: the orphan sweep of the commit protocol, index optimisation,
compaction and removal of old versions."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.schemas import LOCK_TABLE
from pipeline.store.commits import delete_rows, retry_write
from pipeline.store.lease import StoreLock
from pipeline.store.tables import StoreWriter, in_lists, sql_str


def sweep(store: StoreWriter, lease: StoreLock | None = None) -> tuple[dict[str, int], list[str]]:
    """Delete every windows/frames row whose ``(track_id, run_id)`` is not a ``tracks`` row:
    superseded or orphaned rows a killed run left behind. Returns the rows deleted per table and
    the ids of tracks whose windows are missing (never expected: reported, see docs/refresh.md).

    Only the key columns of ``windows`` are scanned (streamed): a frames row is written after,
    and deleted before, the windows row of the same ``(track_id, run_id)``, so orphan frames
    always have orphan windows.
    """
    windows = store.open("windows")
    tracks = store.open("tracks")
    if windows is None:
        return {}, (
            [] if tracks is None else sorted(tracks.to_table(columns=["track_id"])["track_id"].to_pylist())
        )
    keys = ["track_id", "run_id"]
    valid = tracks.to_table(columns=keys) if tracks is not None else pa.schema(
        [("track_id", pa.string()), ("run_id", pa.string())]).empty_table()  # fmt: skip
    parts, found = [], []
    for batch in windows.to_batches(columns=keys):
        pairs = pa.Table.from_batches([batch]).group_by(keys).aggregate([])
        orphans = pairs.join(valid, keys=keys, join_type="left anti")
        if orphans.num_rows:
            parts.append(orphans)
        found.append(pairs.join(valid, keys=keys, join_type="left semi"))
    have = pa.concat_tables(found).group_by(keys).aggregate([]) if found else valid.schema.empty_table()
    missing = sorted(valid.join(have, keys=keys, join_type="left anti")["track_id"].to_pylist())
    by_run: dict[str, set[str]] = {}
    for part in parts:
        for r in part.to_pylist():
            by_run.setdefault(r["run_id"], set()).add(r["track_id"])
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
    return out, missing


def maintain(store: StoreWriter, retention_days: float) -> dict[str, Any]:
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
            ds = store.open(name)
        stats = retry_write(  # idempotent
            f"cleanup of {name}",
            lambda ds=ds: ds.cleanup_old_versions(older_than=dt.timedelta(days=retention_days)),
        )
        rec["old_versions_removed"] = int(getattr(stats, "old_versions", 0))
        rec["bytes_removed"] = int(getattr(stats, "bytes_removed", 0))
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        out[name] = rec
    return out
