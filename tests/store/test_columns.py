"""Derived columns go into ``tracks`` through the store: under the writers' lease, new columns by
``merge``, existing ones updated in place; a refresh holding the lease refuses the write."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import RefreshLocked
from pipeline.schemas import LOCK_TABLE
from pipeline.search.synthetic import write_synthetic_store
from pipeline.store.columns import write_track_columns
from pipeline.store.lease import StoreLock
from pipeline.store.tables import Store


def _coords(ids: list[str], x: float) -> pa.Table:
    return pa.table({"track_id": ids, "map_x": pa.array(np.full(len(ids), x, np.float32))})


def test_columns_are_added_then_updated_under_the_lease(tmp_path) -> None:
    syn = write_synthetic_store(str(tmp_path), n_tracks=12, layers=(6,), dim=8)
    store = Store(str(tmp_path), create=False)
    ref = store.ref("tracks")
    v1 = write_track_columns(ref, _coords(syn.track_ids[:4], 1.0))
    rows = {
        r["track_id"]: r["map_x"]
        for r in store.open("tracks").to_table(columns=["track_id", "map_x"]).to_pylist()
    }
    assert [rows[t] for t in syn.track_ids[:4]] == [1.0] * 4
    assert all(rows[t] is None for t in syn.track_ids[4:])  # tracks missing from the data get nulls
    v2 = write_track_columns(ref, _coords(syn.track_ids[2:6], 2.0))  # the column exists: an update
    assert v2 > v1 > ref.version
    rows = {
        r["track_id"]: r["map_x"]
        for r in store.open("tracks").to_table(columns=["track_id", "map_x"]).to_pylist()
    }
    assert [rows[t] for t in syn.track_ids[:6]] == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert store.open("tracks").count_rows() == 12
    lock = store.open(LOCK_TABLE).to_table().to_pylist()
    assert lock[0]["state"] == "released" and lock[0]["holder"].startswith("columns-")


def test_a_held_lease_refuses_the_write(tmp_path) -> None:
    syn = write_synthetic_store(str(tmp_path), n_tracks=5, layers=(6,), dim=8)
    store = Store(str(tmp_path), create=False)
    ref = store.ref("tracks")
    with StoreLock(store, "refresh-run", ttl_s=60), pytest.raises(RefreshLocked, match="refresh-run"):
        write_track_columns(ref, _coords(syn.track_ids, 1.0))
    assert "map_x" not in store.open("tracks").schema.names
    with pytest.raises(ValueError, match="derived columns"):
        write_track_columns(ref, pa.table({"track_id": ["a"], "title": ["x"]}))
