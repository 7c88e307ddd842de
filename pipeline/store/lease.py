"""The store's writer lease (``_refresh_lock.lance``): one writing run at a time.

The lease is taken and renewed by Lance conditional commits; see :class:`StoreLock`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from pipeline.errors import LeaseLost, RefreshError, RefreshLocked
from pipeline.schemas import LOCK_SCHEMA, LOCK_TABLE, utc_now
from pipeline.store.commits import retry_write
from pipeline.store.tables import Store

log = logging.getLogger("musicfm.refresh")


#: Seconds a lease stays valid without a renewal (``--lock-ttl-s``).
LEASE_TTL_S = 600.0


class StoreLock:
    """A lease on a store for one refresh at a time, kept in ``_refresh_lock.lance``.

    The table holds one row (state, holder run_id, token, host, pid, acquired/heartbeat/expiry
    times). Every change is an ``Overwrite`` commit based on the version just read and committed
    with ``max_retries=0``: Lance writes version N+1's manifest only if it does not exist yet
    (put-if-absent; S3 conditional ``If-None-Match``), and an Overwrite is never rebased over
    another, so of two writers that read version N exactly one succeeds: a compare-and-swap.

    * acquire: read; if held by someone else and not expired, fail (or poll until
      ``wait_s``); else CAS our row in.
    * heartbeat: a thread renews ``expires_at`` every ``ttl_s / 3`` by CAS on the version we
      wrote last; if that fails someone took the expired lease over: the lease is lost.
    * :meth:`check` before every data commit raises :class:`LeaseLost` if the lease is lost or
      about to expire.
    * release: CAS ``state="released"``.
    * a holder that died without releasing (SIGKILL, OOM, a lost node): its lease is taken over
      at once when it is *proven* gone (:func:`holder_gone`: same host and its process no
      longer exists, or ``is_dead(row)`` of the caller says so, e.g. its Ray job has ended in this
      cluster), else it expires after ``ttl_s``. ``break_lease=True`` takes any lease over (the
      manual way out: the user asserts the holder is gone). A live holder is never overridden
      otherwise.
    """

    def __init__(
        self,
        store: Store,
        run_id: str,
        ttl_s: float = LEASE_TTL_S,
        wait_s: float = 0.0,
        *,
        holder_info: Mapping[str, str] | None = None,
        is_dead: Callable[[Mapping[str, Any]], bool] | None = None,
        break_lease: bool = False,
    ) -> None:
        self.store, self.run_id, self.ttl_s, self.wait_s = store, run_id, float(ttl_s), float(wait_s)
        self.holder_info = dict(holder_info or {})
        self.is_dead = is_dead
        self.break_lease = break_lease
        self.took_over: str | None = None  # why a held lease was taken over, if it was
        self.token = uuid.uuid4().hex
        self.version: int | None = None
        self.expires_at: dt.datetime | None = None
        self.acquired_at: dt.datetime | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._mu = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.store.uri(LOCK_TABLE)

    def _row(self, state: str, now: dt.datetime) -> pa.Table:
        return pa.Table.from_pylist(
            [{"state": state, "holder": self.run_id, "token": self.token, "host": socket.gethostname(),
              "pid": os.getpid(), "proc_start": process_start(os.getpid()),
              "ray_session": self.holder_info.get("ray_session"), "ray_job": self.holder_info.get("ray_job"),
              "acquired_at": self.acquired_at or now, "heartbeat_at": now,
              "expires_at": now + dt.timedelta(seconds=self.ttl_s)}],
            schema=LOCK_SCHEMA,
        )  # fmt: skip

    def _cas(self, read_version: int, table: pa.Table) -> int:
        """Commit ``table`` as the whole lock table iff the latest version is ``read_version``.

        A commit whose connection broke may have landed: before retrying, the table is read, and
        if its latest version holds exactly our row (same token and heartbeat) that is our commit.
        """
        import lance

        opts = self.store.lance_options
        frags = lance.fragment.write_fragments(table, self.uri, schema=LOCK_SCHEMA, storage_options=opts)
        op = lance.LanceOperation.Overwrite(LOCK_SCHEMA, frags)
        mine = table.to_pylist()[0]

        def commit() -> int:
            return lance.LanceDataset.commit(self.uri, op, read_version=read_version, max_retries=0,
                                             storage_options=opts).version  # fmt: skip

        def landed() -> int | None:
            version, cur = self._read()
            same = cur is not None and all(cur[k] == mine[k] for k in ("token", "state", "heartbeat_at"))
            return version if same and version > read_version else None

        return retry_write("refresh lease commit", commit, landed)

    def _read(self) -> tuple[int, dict[str, Any] | None]:
        import lance

        ds = self.store.open(LOCK_TABLE)
        if ds is None:
            free = pa.Table.from_pylist([{"state": "released"}], schema=LOCK_SCHEMA)
            with contextlib.suppress(Exception):  # two creators: one wins, both go on below
                lance.write_dataset(free, self.uri, schema=LOCK_SCHEMA, mode="create",
                                    storage_options=self.store.lance_options)  # fmt: skip
            ds = self.store.open(LOCK_TABLE)
            if ds is None:
                raise RefreshError(f"cannot create the lock table {self.uri}")
        rows = ds.to_table().to_pylist()
        return ds.version, (rows[0] if rows else None)

    def holder(self) -> dict[str, Any] | None:
        """The current holder's row if the lease is held and not expired, else ``None``."""
        _, cur = self._read()
        if cur and cur["state"] == "held" and cur["expires_at"] and cur["expires_at"] > utc_now():
            return cur
        return None

    def acquire(self) -> StoreLock:
        from lance.commit import CommitConflictError

        deadline = time.monotonic() + self.wait_s
        while True:
            version, cur = self._read()
            now = utc_now()
            busy = cur and cur["state"] == "held" and cur["expires_at"] and cur["expires_at"] > now
            if busy:
                gone = "--break-lease was given" if self.break_lease else holder_gone(cur, self.is_dead)
                if gone:
                    busy = False
                    self.took_over = f"run {cur['holder']}: {gone}"
            if busy:
                if time.monotonic() < deadline:
                    time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
                    continue
                raise RefreshLocked(
                    f"the store is being refreshed by run {cur['holder']} (host {cur['host']}, pid {cur['pid']}, "
                    f"since {cur['acquired_at']:%Y-%m-%d %H:%M:%S} UTC); its lease expires at "
                    f"{cur['expires_at']:%Y-%m-%d %H:%M:%S} UTC unless renewed. Not starting a second refresh "
                    "(if that run is gone for sure, rerun with --break-lease)."
                )
            self.acquired_at = now
            try:
                self.version = self._cas(version, self._row("held", now))
            except CommitConflictError:
                continue  # someone committed first: read again
            self.expires_at = now + dt.timedelta(seconds=self.ttl_s)
            if self.took_over:
                log.warning("took over the lease of %s", self.took_over)
            elif cur and cur["state"] == "held":
                log.warning("took over the expired lease of run %s", cur["holder"])
            break
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="refresh-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        from lance.commit import CommitConflictError

        period = max(0.2, self.ttl_s / 3)
        while not self._stop.wait(period):
            now = utc_now()
            try:
                with self._mu:
                    if self.lost or self.version is None:
                        return
                    self.version = self._cas(self.version, self._row("held", now))
                    self.expires_at = now + dt.timedelta(seconds=self.ttl_s)
            except CommitConflictError:
                self.lost = "the lease was taken over by another run"
                return
            except Exception as e:  # transient storage errors: try again next period
                log.warning("lease renewal failed (%s); retrying", type(e).__name__)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease for a while."""
        if self.lost:
            raise LeaseLost(f"refresh lease lost: {self.lost}")
        margin = dt.timedelta(seconds=min(5.0, self.ttl_s / 10))
        if self.expires_at is None or utc_now() + margin >= self.expires_at:
            raise LeaseLost("refresh lease expired (the lease could not be renewed in time)")

    def release(self) -> None:
        from lance.commit import CommitConflictError

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._mu:
            if self.lost or self.version is None:
                return
            with contextlib.suppress(CommitConflictError):  # already taken over
                self._cas(self.version, self._row("released", utc_now()))
            self.version = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def process_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot, with the boot id (Linux), or
    ``None`` where ``/proc`` does not tell. Distinguishes a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None


def holder_gone(
    row: Mapping[str, Any], is_dead: Callable[[Mapping[str, Any]], bool] | None = None
) -> str | None:
    """Why the lease holder ``row`` is proven gone, or ``None`` if it may be alive.

    Proven gone: it ran on this host and its process no longer exists (or the pid now belongs to
    a process started later); or ``is_dead(row)`` says so (the caller's knowledge, e.g. the
    holder's Ray job has ended in this very cluster).
    """
    pid = row.get("pid")
    if row.get("host") == socket.gethostname() and pid:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return f"its process {pid} on this host is gone"
        except PermissionError:
            pass  # exists, another user's
        else:
            started = row.get("proc_start")
            now_started = process_start(int(pid))
            if started and now_started and started != now_started:
                return f"its process {pid} on this host is gone (the pid was reused)"
    if is_dead is not None and is_dead(row):
        return "its Ray job has ended"
    return None
