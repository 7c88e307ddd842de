"""The store lease: a live holder is never overridden; a holder proven gone (its process on this
host has exited, or the caller knows its Ray job ended) is taken over at once; --break-lease takes
over any lease."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline.errors import RefreshLocked
from pipeline.schemas import LOCK_SCHEMA, utc_now
from pipeline.store.lease import StoreLock, holder_gone, process_start
from pipeline.store.tables import Store


def _plant(store: Store, **row) -> None:
    """Write a held, unexpired lease row as another run would have left it."""
    import lance

    now = utc_now()
    base = {"state": "held", "holder": "run-other", "token": "t", "host": socket.gethostname(), "pid": os.getpid(),
            "proc_start": None, "ray_session": None, "ray_job": None, "acquired_at": now, "heartbeat_at": now,
            "expires_at": now + dt.timedelta(seconds=600)}  # fmt: skip
    base.update(row)
    lance.write_dataset(
        pa.Table.from_pylist([base], schema=LOCK_SCHEMA), store.uri("_refresh_lock"), mode="overwrite"
    )


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_holder_is_never_overridden(tmp_path) -> None:
    store = Store(str(tmp_path / "s"))
    with StoreLock(store, "run-a"):
        held = StoreLock(store, "probe").holder()
        assert held is not None and held["proc_start"] == process_start(os.getpid())
        assert holder_gone(held) is None  # this very process
        with pytest.raises(RefreshLocked, match="--break-lease"):
            StoreLock(store, "run-b").acquire()


def test_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path) -> None:
    store = Store(str(tmp_path / "s"))
    _plant(store, pid=_dead_pid())
    lock = StoreLock(store, "run-b").acquire()
    try:
        assert lock.took_over and "is gone" in lock.took_over and "run-other" in lock.took_over
        assert StoreLock(store, "probe").holder()["holder"] == "run-b"
    finally:
        lock.release()


def test_a_reused_pid_is_not_the_holder(tmp_path) -> None:
    store = Store(str(tmp_path / "s"))
    _plant(store, pid=os.getpid(), proc_start="another-boot:1")  # our pid, another process's start
    assert "reused" in holder_gone(StoreLock(store, "probe").holder())


def test_other_hosts_need_proof_or_break_lease(tmp_path) -> None:
    store = Store(str(tmp_path / "s"))
    _plant(store, host="some-other-host", pid=1, ray_session="s1", ray_job="01000000")
    with pytest.raises(RefreshLocked):
        StoreLock(store, "run-b").acquire()
    lock = StoreLock(store, "run-c", is_dead=lambda row: row["ray_job"] == "01000000").acquire()
    assert "Ray job has ended" in lock.took_over
    lock.release()
    _plant(store, host="some-other-host", pid=1)
    lock = StoreLock(store, "run-d", break_lease=True).acquire()
    assert "--break-lease" in lock.took_over
    lock.release()
