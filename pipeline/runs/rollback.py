"""The rollback command's run: return a store's vector tables to an earlier ``ok`` run's state
(:func:`pipeline.store.snapshots.rollback`), under the store's lease, recorded in ``runs.lance``
(``kind="rollback"``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from pipeline import schemas
from pipeline.flow.runtime import driver_identity
from pipeline.runs.report import new_run_id
from pipeline.store.commits import append_once
from pipeline.store.lease import LEASE_TTL_S, StoreLock
from pipeline.store.snapshots import rollback
from pipeline.store.tables import Store


@dataclass(frozen=True)
class RollbackResult:
    run_id: str  # this rollback's own run id
    to_run: str  # the run whose state the store now has
    versions: dict[str, int]  # the new latest versions (equal to ``to_run``'s)
    model_id: str | None  # that run's model


def run_rollback(store_uri: str, to_run: str | None = None, storage_options: dict | None = None,
                 lock_ttl_s: float = LEASE_TTL_S) -> RollbackResult:  # fmt: skip
    """Roll the store at ``store_uri`` back to run ``to_run`` (default: the run before the newest
    kept one). ValueError when there is no such snapshot; RefreshLocked when a run holds the store."""
    store = Store(store_uri, storage_options)
    if store.open("tracks") is None:
        raise ValueError(f"no embedding store at {store_uri}")
    run_id = new_run_id()
    lease = StoreLock(store, run_id, lock_ttl_s, holder_info=driver_identity())
    lease.acquire()
    try:
        started = schemas.utc_now()
        target, versions = rollback(store, to_run)
        runs = store.open("runs")
        rows = (
            [] if runs is None else runs.to_table(columns=["run_id", "model_id", "settings_id"]).to_pylist()
        )
        mine = next((r for r in rows if r["run_id"] == target), {})
        row = {name: None for name in schemas.RUNS_SCHEMA.names}
        row.update(run_id=run_id, kind="rollback", status="ok", started_at=started, finished_at=schemas.utc_now(),
                   args_json=json.dumps({"to_run": target}), model_id=mine.get("model_id"),
                   settings_id=mine.get("settings_id"), report_json=json.dumps({"versions": versions}))  # fmt: skip
        append_once(store, "runs", pa.Table.from_pylist([row], schema=schemas.RUNS_SCHEMA), run_id)
    finally:
        lease.release()
    return RollbackResult(run_id, target, versions, mine.get("model_id"))
