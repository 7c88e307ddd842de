"""The orphan sweep (``pipeline.store.maintenance.sweep``) on real Lance tables: the same rows
deleted and the same tracks reported whether it holds the whole store or one hash bucket of
track ids at a time (its memory bound for large stores)."""

from __future__ import annotations

import shutil
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from pipeline.store import maintenance
from pipeline.store.maintenance import hash_buckets, sweep
from pipeline.store.tables import Store
from tools.testkit.stores import orphan_store


@pytest.mark.parametrize("bucket_rows", [1_000_000, 8])
def test_sweep_is_the_same_bucket_by_bucket(tmp_path: Path, monkeypatch, bucket_rows: int) -> None:
    store = orphan_store(tmp_path / "s")
    monkeypatch.setattr(maintenance, "SWEEP_BUCKET_ROWS", bucket_rows)  # 50 tracks: 1 or 7 buckets
    deleted, missing, n_missing = sweep(Store(str(store)))
    assert deleted == {"frames": 4, "windows": 4} and missing == ["t09"] and n_missing == 1
    for name in ("windows", "frames"):
        left = lance.dataset(str(store / f"{name}.lance")).to_table()
        assert set(left["run_id"].to_pylist()) == {"r1"} and left.num_rows == 98
    shutil.rmtree(store)


def test_hash_buckets_are_stable_and_spread() -> None:
    ids = pa.array([f"id-{i}" for i in range(10_000)] + [None])
    a, b = hash_buckets(ids, 16), hash_buckets(ids.slice(0, 5000), 16)
    assert (a[:5000] == b).all() and a.min() == 0 and a.max() == 15
    counts = [int((a == k).sum()) for k in range(16)]
    assert min(counts) > 500  # about 625 each
