"""Derived columns written into ``tracks`` (catalog map coordinates, probe predictions), under the
writers' lease (:class:`pipeline.store.lease.StoreLock`) and with the commit retries of
:mod:`pipeline.store.commits`: a refresh and an insight never write the store at once.
"""

from __future__ import annotations

import uuid

import pyarrow as pa

from pipeline.schemas import is_derived_column
from pipeline.store.commits import retry_write
from pipeline.store.lease import StoreLock
from pipeline.store.tables import StoreRef

#: Seconds the lease of a derived-column write lives unless renewed (its heartbeat renews it).
COLUMNS_LEASE_TTL_S = 600.0


def write_track_columns(ref: StoreRef, data: pa.Table, holder: str | None = None, wait_s: float = 0.0) -> int:
    """Write the columns of ``data`` (``track_id`` plus derived columns, see
    :func:`pipeline.schemas.is_derived_column`) into ``tracks`` on ``track_id``.

    Columns new to the table are added with Lance ``merge`` (a join on ``track_id`` that writes
    only the new columns' data files; tracks missing from ``data`` get nulls). When every column
    exists already, the given rows are updated in place with a partial ``merge_insert``
    (other rows and columns untouched). Both run under the store's lease (``holder`` names the
    writer; raises ``RefreshLocked`` while a refresh holds it after ``wait_s``) and are retried when
    their connection broke. Returns the new table version.
    """
    bad = [c for c in data.column_names if c != "track_id" and not is_derived_column(c)]
    if bad or "track_id" not in data.column_names:
        raise ValueError(f"write_track_columns takes track_id plus derived columns, got {data.column_names}")
    with StoreLock(
        ref.store(), holder or f"columns-{uuid.uuid4().hex[:12]}", COLUMNS_LEASE_TTL_S, wait_s
    ) as lease:
        return _write_columns(ref.latest(), data, lease)


def _write_columns(ref: StoreRef, data: pa.Table, lease: StoreLock) -> int:
    ds = ref.open()
    have = set(ds.schema.names)
    new = [c for c in data.column_names if c != "track_id" and c not in have]
    old = [c for c in data.column_names if c != "track_id" and c in have]
    if new:
        lease.check()

        def added() -> int | None:  # the merge landed although its connection broke
            now = ref.open()
            return now.version if set(new) <= set(now.schema.names) else None

        retry_write("merge of tracks columns", lambda: ds.merge(data.select(["track_id", *new]), left_on="track_id"),
                    added)  # fmt: skip
        ds = ref.open()
    if old and data.num_rows:
        part = data.select(["track_id", *old])
        want = ds.schema
        part = pa.table({c: part[c].cast(want.field(c).type) for c in part.column_names})
        lease.check()
        retry_write(  # an update of the same rows again is harmless
            "update of tracks columns",
            lambda: ds.merge_insert("track_id").when_matched_update_all().execute(part),
        )
        ds = ref.open()
    return ds.version
