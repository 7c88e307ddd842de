"""Nightly catalog refresh: incremental, atomic per chunk, resumable, one writer at a time.

:func:`run_refresh` brings an embedding store in line with a catalog without redoing what is
already there. It shares the embed job's steps (:mod:`pipeline.embed`: catalog reading, model
probe, decode/model actor pools, table rows, distributed fragment writes) and adds:

Plan (:func:`make_plan`)
    Every catalog row is compared with ``tracks.lance`` by ``track_id`` on three things: the
    object's ``content_version`` (ETag, or size+mtime, read from object metadata in parallel:
    a thread pool on the driver, a Ray map for large catalogs; no audio is downloaded), its
    ``uri``, and the settings fingerprint ``settings_id`` (model, layers, window/hop, frame
    rate, precision). Kinds: ``new``, ``changed`` (content or uri), ``settings`` (fingerprint),
    ``metadata`` (only catalog columns differ: the track row is updated, no model work),
    ``unchanged`` (not touched at all), ``removed`` (in the store, not in the catalog: deleted
    with ``delete_missing``, else ``kept``) and ``lookup_failed`` (object metadata unreadable:
    an error row; the stored embedding, if any, is kept).

Apply, per chunk of ``chunk_size`` tracks (the commit protocol; see ``docs/refresh.md``)
    1. append the chunk's ``windows`` rows (then ``frames``), tagged with this run's ``run_id``;
    2. ``merge_insert`` the chunk's ``tracks`` rows on ``track_id`` (they now carry the run_id);
    3. delete the chunk's superseded ``frames``, then ``windows`` rows (same track, other run_id).
    Readers join ``tracks`` to ``windows``/``frames`` on ``(track_id, run_id)``, so at every
    version a track row points at exactly one complete set of windows. Removed tracks lose their
    ``tracks`` row first, then their frames and windows. A final *sweep* deletes every
    ``windows``/``frames`` row whose ``(track_id, run_id)`` is not a track row (what a killed run
    left behind), so a rerun after a crash at any point converges to the clean result.

One writer
    :class:`StoreLock`: a lease in ``_refresh_lock.lance`` taken and renewed by Lance conditional
    commits (an ``Overwrite`` based on the version read, committed without retry: of two writers
    that read the same version exactly one commits, on S3 through Lance's put-if-absent of the
    manifest). A second refresh fails fast with :class:`RefreshLocked`, or waits ``lock_wait_s``.

Maintenance (after the changes)
    Compaction of small fragments, index optimisation where a table has indices, and removal of
    versions older than ``retention_days``. Everything, with the version pins of each table, is
    recorded in the ``runs.lance`` row (``kind="refresh"``).

Test hook: ``MUSICFM_FAIL_AT=<step>[:<chunk>]`` raises :class:`InjectedFailure` at a named step
(:data:`FAIL_STEPS`), to test that reruns converge.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.embed import (
    EmbedJob,
    ModelInfo,
    RunReport,
    _audio_seconds,
    _catalog_rows,
    _error_table,
    append_fragments_once,
    append_once,
    configure_data_context,
    ensure_ray,
    finish_report,
    new_run_id,
    probe_model,
    retry_write,
    write_run_row,
)
from pipeline.store import Store, in_list, in_lists, sql_str
from pipeline.streaming import ChunkOutput, stream_chunks, table_schema

log = logging.getLogger("musicfm.refresh")

FAIL_ENV = "MUSICFM_FAIL_AT"
#: Steps where ``MUSICFM_FAIL_AT`` can inject a failure, in the order a run reaches them.
FAIL_STEPS = (
    "lock_acquired",  # lease taken, nothing read yet
    "planned",  # plan made, nothing written
    "tracks_deleted",  # removed tracks' rows deleted from tracks, their windows/frames not yet
    "metadata_updated",  # metadata-only track rows updated (per chunk)
    "windows_appended",  # chunk's windows committed, frames/tracks not yet (per chunk)
    "frames_appended",  # chunk's frames committed, tracks not yet (per chunk)
    "tracks_merged",  # chunk's tracks merged, superseded windows/frames not yet deleted (per chunk)
    "chunk_done",  # chunk fully committed, next chunk not started (per chunk)
    "swept",  # orphan windows/frames deleted, maintenance not yet done
    "maintained",  # maintenance done, run row not yet written
)

LOCK_TABLE = "_refresh_lock"
LOCK_SCHEMA = pa.schema(
    [
        pa.field("state", pa.string(), nullable=False),  # "held" | "released"
        pa.field("holder", pa.string()),  # run_id of the holder
        pa.field("token", pa.string()),  # random per acquisition
        pa.field("host", pa.string()),
        pa.field("pid", pa.int64()),
        pa.field("acquired_at", schemas.TIMESTAMP),
        pa.field("heartbeat_at", schemas.TIMESTAMP),
        pa.field("expires_at", schemas.TIMESTAMP),
    ]
)

#: Catalogs with at least this many rows have their object metadata read by a Ray map.
LOOKUP_RAY_MIN_ROWS = 20_000

_TRACK_FIXED = frozenset(
    {
        "track_id", "uri", "content_version", "duration_s", "sample_rate_in", "channels_in", "num_windows",
        "warnings", "model_id", "settings_id", "run_id", "embedded_at",
    }
)  # fmt: skip


class RefreshError(RuntimeError):
    """A refresh that cannot proceed (incompatible store, unsafe plan)."""


class RefreshLocked(RefreshError):
    """Another refresh holds the store's lease."""


class LeaseLost(RefreshError):
    """This run's lease expired or was taken over; it stops before its next commit."""


class InjectedFailure(RuntimeError):
    """Raised by :func:`failpoint` when ``MUSICFM_FAIL_AT`` names the step (tests only)."""


def failpoint(step: str, chunk: int | None = None) -> None:
    """Raise :class:`InjectedFailure` when ``MUSICFM_FAIL_AT`` is ``step`` or ``step:chunk``."""
    want = os.environ.get(FAIL_ENV, "").strip()
    if not want:
        return
    name, _, at = want.partition(":")
    if name != step:
        return
    if at and (chunk is None or int(at) != chunk):
        return
    raise InjectedFailure(f"injected failure at {want}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _event(msg: str, run_id: str, level: int = logging.INFO, **fields: Any) -> None:
    """One log event; with ``--log-format json`` one JSON line carrying ``fields``."""
    fields = {"run_id": run_id, **fields}
    log.log(level, msg + "".join(f" {k}={v}" for k, v in fields.items() if not isinstance(v, dict | list)),
            extra={"fields": {"step": msg, **fields}})  # fmt: skip


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class RefreshJob:
    """A refresh: what to embed and how (``embed``, whose ``output`` is the store) plus the
    refresh's own settings."""

    embed: EmbedJob
    dry_run: bool = False
    delete_missing: bool = True
    chunk_size: int = 1000
    retention_days: float = 7.0
    max_delete_fraction: float = 0.5
    lock_ttl_s: float = 600.0
    lock_wait_s: float = 0.0
    lookup_threads: int = 32
    lookup_ray_min_rows: int = LOOKUP_RAY_MIN_ROWS
    maintenance: bool = True
    sample: int = 5

    def __post_init__(self) -> None:
        if self.embed.format != "lance":
            raise ValueError("refresh works on Lance stores only (--format lance)")
        if self.chunk_size < 1:
            raise ValueError("--chunk-size must be >= 1")
        if self.retention_days < 0:
            raise ValueError("--retention-days must be >= 0")
        if not 0.0 <= self.max_delete_fraction <= 1.0:
            raise ValueError("--max-delete-fraction must be within [0, 1]")
        if self.lock_ttl_s <= 0 or self.lock_wait_s < 0:
            raise ValueError("--lock-ttl-s must be > 0 and --lock-wait-s >= 0")
        if self.lookup_threads < 1:
            raise ValueError("--lookup-threads must be >= 1")

    @property
    def store(self) -> str:
        return self.embed.output

    def public_args(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "embed"}
        return d


@dataclass
class RefreshReport(RunReport):
    """:class:`RunReport` of a refresh: ``tracks_ok``/``windows``/``audio_s`` count what this run
    embedded; ``plan`` the plan counts; ``deleted`` tracks removed; ``chunks`` chunks committed."""

    plan: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)
    deleted: int = 0
    metadata_updated: int = 0
    chunks: int = 0
    garbage_rows: dict[str, int] = field(default_factory=dict)
    maintenance: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False

    def summary(self) -> str:
        p = self.plan
        lines = [
            f"refresh {self.run_id}: {self.status}" + (" (dry run: nothing written)" if self.dry_run else ""),
            "  plan     " + ", ".join(f"{k} {v}" for k, v in p.items()),
        ]
        for kind, ids in self.samples.items():
            if ids:
                lines.append(f"  {kind:<8} e.g. " + ", ".join(ids))
        if not self.dry_run:
            lines += [
                f"  embedded {self.tracks_ok} tracks, {self.windows} windows"
                + (f", {self.frames} frames" if self.frames else "")
                + f" in {self.chunks} chunk(s); failed {self.tracks_failed}",
                f"  deleted  {self.deleted} tracks; metadata updated {self.metadata_updated}; "
                f"orphans swept {sum(self.garbage_rows.values())}",
                f"  audio    {self.audio_s / 3600:.3f} h in {self.wall_s:.1f} s wall = "
                f"{self.x_realtime:.1f}x realtime",
                "  stages   " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_s.items()),
                "  versions " + ", ".join(f"{k} {v}" for k, v in sorted(self.versions.items())),
            ]
        if self.errors_by_type:
            lines.append(
                "  errors   " + ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_type.items()))
            )
        if self.extra.get("reason"):
            lines.append(f"  reason   {self.extra['reason']}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- content versions


def _lookup_many(rows: Sequence[Mapping[str, Any]], storage_options: dict | None, threads: int) -> list[dict]:
    """``content_version`` of each row's uri from object metadata, ``threads`` lookups at a time."""
    from pipeline.catalog import content_version
    from pipeline.errors import error_type, one_line, redact

    def one(r: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return {"track_id": r["track_id"], "content_version": content_version(r["uri"], storage_options=storage_options),
                    "error_type": None, "message": None}  # fmt: skip
        except Exception as e:  # a missing/unreadable object is an error row, not a failed run
            return {"track_id": r["track_id"], "content_version": None, "error_type": error_type(e),
                    "message": redact(one_line(str(e) or type(e).__name__))}  # fmt: skip

    if len(rows) <= 1 or threads <= 1:
        return [one(r) for r in rows]
    with cf.ThreadPoolExecutor(max_workers=min(threads, len(rows))) as pool:
        return list(pool.map(one, rows))


def _lookup_batch(batch: pa.Table, storage_options: dict | None, threads: int) -> pa.Table:
    """Ray Data ``map_batches`` function: object metadata lookups of one block."""
    out = _lookup_many(batch.select(["track_id", "uri"]).to_pylist(), storage_options, threads)
    return pa.Table.from_pylist(out, schema=_LOOKUP_SCHEMA)


_LOOKUP_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("content_version", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


def lookup_versions(
    rows: Sequence[Mapping[str, Any]],
    storage_options: dict | None,
    threads: int = 32,
    ray_min_rows: int = LOOKUP_RAY_MIN_ROWS,
) -> dict[str, dict[str, Any]]:
    """``track_id -> {content_version, error_type, message}`` for catalog rows, read from object
    metadata (no download): a thread pool here, or a Ray map (blocks of 500 rows, each with its
    own thread pool) when there are at least ``ray_min_rows`` rows."""
    if len(rows) >= ray_min_rows and rows:
        import ray

        ensure_ray()
        items = [{"track_id": r["track_id"], "uri": r["uri"]} for r in rows]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 500 + 1, 1000)))
        res = ds.map_batches(_lookup_batch, fn_kwargs={"storage_options": storage_options, "threads": threads},
                             batch_format="pyarrow", batch_size=None)  # fmt: skip
        parts = [t for t in ray.get(res.to_arrow_refs()) if t.num_rows]
        out = pa.concat_tables(parts).to_pylist() if parts else []
    else:
        out = _lookup_many(rows, storage_options, threads)
    return {r["track_id"]: r for r in out}


# --------------------------------------------------------------------------- plan


PLAN_KINDS = (
    "new",
    "changed",
    "settings",
    "metadata",
    "unchanged",
    "removed",
    "kept",
    "lookup_failed",
    "rejected",
)


@dataclass
class Plan:
    """What a refresh will do. ``new``/``changed``/``settings`` are catalog rows to embed (with
    the planned ``content_version``); ``metadata`` are (catalog row, stored row) pairs; the rest
    are track ids (``lookup_failed``/``rejected``: error rows)."""

    new: list[dict[str, Any]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    lookup_failed: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    stored_tracks: int = 0

    @property
    def todo(self) -> list[dict[str, Any]]:
        """Catalog rows to embed, in catalog order within each kind."""
        return self.new + self.changed + self.settings

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in PLAN_KINDS}

    def samples(self, n: int) -> dict[str, list[str]]:
        def tid(x: Any) -> str:
            if isinstance(x, str):
                return x
            return str(x.get("row", x).get("track_id"))

        return {k: [tid(x) for x in getattr(self, k)[:n]] for k in PLAN_KINDS if k != "unchanged"}


def stored_metadata_columns(schema: pa.Schema) -> list[str]:
    """Catalog metadata columns of a ``tracks`` schema, in table order."""
    return [
        f.name
        for f in schema
        if f.name not in _TRACK_FIXED
        and schemas.parse_layer_column(f.name) is None
        and not schemas.is_derived_column(f.name)  # predictions / map: not catalog metadata
    ]


def make_plan(
    rows: Sequence[Mapping[str, Any]],
    stored: pa.Table | None,
    versions: Mapping[str, Mapping[str, Any]],
    settings_id: str,
    meta_cols: Sequence[str],
    delete_missing: bool,
    present_ids: Iterable[str] = (),
) -> Plan:
    """Compare catalog ``rows`` (track_id, uri, metadata_json) with the ``stored`` track rows
    (track_id, uri, content_version, settings_id and the metadata columns).

    ``versions`` maps track_id to its looked-up ``content_version`` (or error). ``present_ids``
    are ids of catalog rows that were rejected: they count as present, never as removed.
    """
    plan = Plan()
    by_id: dict[str, dict[str, Any]] = {}
    if stored is not None and stored.num_rows:
        by_id = {r["track_id"]: r for r in stored.to_pylist()}
    plan.stored_tracks = len(by_id)
    seen = set(present_ids)
    for r in rows:
        tid = r["track_id"]
        seen.add(tid)
        v = versions.get(tid) or {}
        cur = by_id.get(tid)
        if v.get("content_version") is None:
            plan.lookup_failed.append({"track_id": tid, "uri": r["uri"], "stage": "lookup",
                                       "error_type": v.get("error_type") or "FetchError",
                                       "message": v.get("message") or "no content version"})  # fmt: skip
            continue
        row = {**r, "content_version": v["content_version"]}
        if cur is None:
            plan.new.append(row)
        elif cur.get("content_version") != v["content_version"] or cur.get("uri") != r["uri"]:
            plan.changed.append(row)
        elif cur.get("settings_id") != settings_id:
            plan.settings.append(row)
        else:
            meta = json.loads(r.get("metadata_json") or "{}")
            if any(meta.get(m) != cur.get(m) for m in meta_cols):
                plan.metadata.append({"row": row, "stored": cur})
            else:
                plan.unchanged.append(tid)
    for tid in by_id:
        if tid not in seen:
            (plan.removed if delete_missing else plan.kept).append(tid)
    return plan


# --------------------------------------------------------------------------- the lease


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
    * release: CAS ``state="released"``. A killed holder's lease expires after ``ttl_s``.
    """

    def __init__(self, store: Store, run_id: str, ttl_s: float = 600.0, wait_s: float = 0.0) -> None:
        self.store, self.run_id, self.ttl_s, self.wait_s = store, run_id, float(ttl_s), float(wait_s)
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
              "pid": os.getpid(), "acquired_at": self.acquired_at or now, "heartbeat_at": now,
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
        if cur and cur["state"] == "held" and cur["expires_at"] and cur["expires_at"] > _now():
            return cur
        return None

    def acquire(self) -> StoreLock:
        from lance.commit import CommitConflictError

        deadline = time.monotonic() + self.wait_s
        while True:
            version, cur = self._read()
            now = _now()
            busy = cur and cur["state"] == "held" and cur["expires_at"] and cur["expires_at"] > now
            if busy:
                if time.monotonic() < deadline:
                    time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
                    continue
                raise RefreshLocked(
                    f"the store is being refreshed by run {cur['holder']} (host {cur['host']}, pid {cur['pid']}, "
                    f"since {cur['acquired_at']:%Y-%m-%d %H:%M:%S} UTC); its lease expires at "
                    f"{cur['expires_at']:%Y-%m-%d %H:%M:%S} UTC unless renewed. Not starting a second refresh."
                )
            self.acquired_at = now
            try:
                self.version = self._cas(version, self._row("held", now))
            except CommitConflictError:
                continue  # someone committed first: read again
            self.expires_at = now + dt.timedelta(seconds=self.ttl_s)
            if cur and cur["state"] == "held":
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
            now = _now()
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
        if self.expires_at is None or _now() + margin >= self.expires_at:
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
                self._cas(self.version, self._row("released", _now()))
            self.version = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- helpers


def _batches(values: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(values), n):
        yield values[i : i + n]


def _delete(ds: Any, predicate: str) -> int:
    """Delete rows matching ``predicate`` (retried if the connection broke: a delete is
    idempotent); returns the rows deleted (0 if none matched)."""
    res = retry_write(f"delete from {ds.uri.rstrip('/').rsplit('/', 1)[-1]}", lambda: ds.delete(predicate))
    n = getattr(res, "num_deleted_rows", None)
    if n is None and isinstance(res, Mapping):
        n = res.get("num_deleted_rows")
    return int(n or 0)


def _read_stored(store: Store) -> tuple[Any, pa.Table | None]:
    ds = store.open("tracks")
    if ds is None:
        return None, None
    cols = [
        "track_id",
        "uri",
        "content_version",
        "settings_id",
        "run_id",
        *stored_metadata_columns(ds.schema),
    ]
    return ds, ds.to_table(columns=cols)


def _check_schemas(store: Store, info: ModelInfo, meta_cols: Sequence[str]) -> None:
    """Refuse a refresh whose settings change a table's schema (layers or vector size)."""
    layers, dim = info.settings.layers, info.dim
    expected = {
        "tracks": schemas.tracks_schema(layers, dim, meta_cols),
        "windows": schemas.windows_schema(layers, dim),
    }
    if info.settings.frames_hz:
        expected["frames"] = schemas.frames_schema(layers, dim)
    for name, want in expected.items():
        ds = store.open(name)
        if ds is None:
            continue
        got = ds.schema.remove_metadata()
        if name == "tracks":  # columns added by the insights jobs are not the embed job's schema
            got = pa.schema([f for f in got if not schemas.is_derived_column(f.name)])
        if not got.equals(want, check_metadata=False):
            have = [f"{f.name}:{f.type}" for f in got if schemas.parse_layer_column(f.name) is not None]
            need = [f"{f.name}:{f.type}" for f in want if schemas.parse_layer_column(f.name) is not None]
            raise RefreshError(
                f"{name}.lance has vector columns {have} but these settings produce {need}: a refresh "
                "cannot change layers or the model size in place; rebuild with embed_catalog (or refresh "
                "into a new store)"
            )


def _merge_tracks(store: Store, tbl: pa.Table) -> int:
    """Upsert track rows on ``track_id`` (the tracks table is created by the first chunk)."""
    import lance

    ds = store.open("tracks")
    if ds is None:
        return lance.write_dataset(tbl, store.uri("tracks"), schema=tbl.schema, mode="create",
                                   storage_options=store.lance_options).version  # fmt: skip
    retry_write(  # an upsert of the same rows again is harmless
        "merge of tracks",
        lambda: (
            ds.merge_insert("track_id").when_matched_update_all().when_not_matched_insert_all().execute(tbl)
        ),
    )
    return store.open("tracks").version


# --------------------------------------------------------------------------- apply steps


@dataclass
class _Ctx:
    job: RefreshJob
    store: Store
    run_id: str
    report: RefreshReport
    lease: StoreLock
    stage_s: dict[str, float]
    error_rows: list[dict[str, Any]]

    def timed(self, key: str) -> _Timer:
        return _Timer(self.stage_s, key)


class _Timer:
    def __init__(self, stage_s: dict[str, float], key: str) -> None:
        self.stage_s, self.key = stage_s, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.stage_s[self.key] = self.stage_s.get(self.key, 0.0) + time.perf_counter() - self.t0


def delete_tracks(c: _Ctx, track_ids: Sequence[str]) -> int:
    """Removed tracks: their ``tracks`` rows first, then their frames, then their windows."""
    if not track_ids:
        return 0
    n = 0
    ids = sorted(track_ids)
    ds = c.store.open("tracks")
    for pred in in_lists("track_id", ids):
        c.lease.check()
        n += _delete(ds, pred)
    failpoint("tracks_deleted")
    for name in ("frames", "windows"):  # frames first: frames rows never outlive their windows rows
        tds = c.store.open(name)
        if tds is None:
            continue
        for pred in in_lists("track_id", ids):
            c.lease.check()
            _delete(tds, pred)
    return n


def update_metadata(c: _Ctx, items: Sequence[Mapping[str, Any]], meta_cols: Sequence[str]) -> int:
    """Metadata-only changes: rewrite those track rows with the catalog's values (same run_id,
    same vectors, so their windows stay valid). No model work."""
    n = 0
    for ci, part in enumerate(_batches(list(items), c.job.chunk_size)):
        ids = [it["row"]["track_id"] for it in part]
        new_meta = {it["row"]["track_id"]: json.loads(it["row"].get("metadata_json") or "{}") for it in part}
        ds = c.store.open("tracks")
        cur = ds.to_table(filter=in_list("track_id", ids))
        cols = {name: cur[name] for name in cur.schema.names}
        for m in meta_cols:
            cols[m] = pa.array(
                [new_meta[t].get(m) for t in cur["track_id"].to_pylist()], cur.schema.field(m).type
            )
        tbl = pa.table(cols, schema=cur.schema)
        c.lease.check()
        retry_write("metadata update of tracks",
                    lambda ds=ds, tbl=tbl: ds.merge_insert("track_id").when_matched_update_all().execute(tbl))  # fmt: skip
        n += tbl.num_rows
        failpoint("metadata_updated", ci)
    return n


def embed_and_commit(
    c: _Ctx, todo: Sequence[Mapping[str, Any]], info: ModelInfo, meta_cols: Sequence[str]
) -> None:
    """Embed every track to do in one streaming Ray pass (:func:`pipeline.streaming.stream_chunks`)
    and commit it chunk by chunk as each chunk's tracks come out of the stream (decode and model
    keep running while the driver commits), in the order of the commit protocol (:func:`commit_chunk`).
    One pass means one actor-pool start (one model load per actor) however many chunks there are."""
    res = stream_chunks(
        list(todo), c.job.embed, info, c.store, c.run_id, meta_cols, c.job.chunk_size,
        lambda out: commit_chunk(c, out, info), c.stage_s,
    )  # fmt: skip
    c.report.extra["actor_restarts"] = res.restarts
    c.report.audio_s = _audio_seconds(res.times)


def commit_chunk(c: _Ctx, out: ChunkOutput, info: ModelInfo) -> None:
    """One chunk of the commit protocol: windows/frames append, tracks merge, superseded delete.
    This run's rows of failed tracks (a window failed in the model) are left to the sweep."""
    store, run_id = c.store, c.run_id
    c.error_rows += out.error_rows
    with c.timed("commit"):
        for name in ("windows", "frames"):  # (1) new rows, tagged with this run_id
            frags = out.fragments[name]
            if frags:
                c.lease.check()
                append_fragments_once(store, name, table_schema(info, name), frags)
                failpoint(f"{name}_appended", out.ix)
        c.lease.check()
        ids = out.tracks["track_id"].to_pylist()
        if ids:  # (2) the tracks now point at the new rows
            _merge_tracks(store, out.tracks)
        failpoint("tracks_merged", out.ix)
        for name in ("frames", "windows"):  # (3) the superseded rows of those tracks, frames first
            ds = store.open(name)
            if ds is None or not ids:
                continue
            for pred in in_lists("track_id", ids):
                c.lease.check()
                _delete(ds, f"{pred} AND run_id != {sql_str(run_id)}")
    c.report.tracks_ok += len(ids)
    c.report.windows += out.times.num_rows
    c.report.frames += sum(f.physical_rows for f in out.fragments["frames"])
    c.report.chunks += 1
    _event("chunk committed", run_id, chunk=out.ix, tracks=len(ids), failed=len(out.failed),
           embedded_total=c.report.tracks_ok, versions=store.versions())  # fmt: skip
    failpoint("chunk_done", out.ix)


def sweep(store: Store, lease: StoreLock | None = None) -> tuple[dict[str, int], list[str]]:
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
                n += _delete(ds, f"run_id = {sql_str(rid)} AND {pred}")
        out[name] = n
    return out, missing


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
            rec["indices"] = _optimize_indices(store, name, ds)
            ds = store.open(name)
        if name != LOCK_TABLE and len(ds.get_fragments()) > 1:
            m = ds.optimize.compact_files(materialize_deletions_threshold=0.1)
            rec["fragments_removed"], rec["fragments_added"] = (
                int(m.fragments_removed),
                int(m.fragments_added),
            )
            ds = store.open(name)
        stats = ds.cleanup_old_versions(older_than=dt.timedelta(days=retention_days))
        rec["old_versions_removed"] = int(getattr(stats, "old_versions", 0))
        rec["bytes_removed"] = int(getattr(stats, "bytes_removed", 0))
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        out[name] = rec
    return out


def _optimize_indices(store: Store, name: str, ds: Any) -> list[str]:
    """Fold new rows into the table's existing indices (``pipeline.index.optimize_indexes`` when
    that module provides it, else Lance's ``optimize_indices``); no retraining."""
    try:
        from pipeline import index as index_mod
    except ImportError:  # pragma: no cover - the index module is optional
        index_mod = None
    fn: Callable[..., Any] | None = getattr(index_mod, "optimize_indexes", None)
    if fn is not None:
        fn(store.root, storage_options=store.storage_options or None, tables=[name])
    else:
        ds.optimize.optimize_indices()
    return [d.name for d in ds.describe_indices()]


# --------------------------------------------------------------------------- the run


def _model_info(job: EmbedJob) -> ModelInfo:
    """Model id and settings fingerprint for the plan; starts/joins Ray only when the precision
    depends on the cluster's GPUs (``auto``/``fp16``)."""
    if job.precision in ("auto", "fp16"):
        import ray

        ensure_ray()
        return probe_model(job, int(ray.cluster_resources().get("GPU", 0)))
    return probe_model(job, 0)


def run_refresh(job: RefreshJob, progress: bool = False) -> RefreshReport:
    """Run a refresh (or plan one with ``dry_run``) and return its report, also stored in
    ``runs.lance`` (``kind="refresh"``) unless dry.

    Raises:
        RefreshLocked: another refresh holds the store (nothing was written).
        RefreshError: the settings would change a table schema, or the plan deletes more than
            ``max_delete_fraction`` of the store (nothing was written).
    """
    t_start, started_at = time.perf_counter(), _now()
    run_id = job.embed.run_id or new_run_id()
    stage_s: dict[str, float] = {}
    report = RefreshReport(run_id=run_id, status="running", dry_run=job.dry_run)
    local_missing = "://" not in job.store and not os.path.isdir(job.store)
    if job.dry_run and local_missing:
        store = None  # nothing to read, and a dry run creates nothing
    else:
        store = Store(job.store, job.embed.storage_options)
    lease = (
        StoreLock(store, run_id, job.lock_ttl_s, job.lock_wait_s)
        if store is not None and not job.dry_run
        else None
    )
    if lease is not None:
        t0 = time.perf_counter()
        lease.acquire()
        stage_s["lock"] = time.perf_counter() - t0
        _event("lock acquired", run_id, store=job.store, ttl_s=job.lock_ttl_s)
    try:
        failpoint("lock_acquired")
        return _run_locked(job, store, lease, run_id, report, stage_s, t_start, started_at, progress)
    except BaseException as e:
        if lease is not None and not isinstance(e, RefreshError):
            _record_failure(job, store, report, stage_s, t_start, started_at, e)
        raise
    finally:
        if lease is not None:
            lease.release()


def _record_failure(job: RefreshJob, store: Store, report: RefreshReport, stage_s: dict[str, float],
                    t_start: float, started_at: dt.datetime, exc: BaseException) -> None:  # fmt: skip
    """Best effort: a run row with ``status="failed"`` for a run that stopped on an exception."""
    with contextlib.suppress(Exception):
        report.status = "failed"
        report.extra["reason"] = f"{type(exc).__name__}: {exc}"[:500]
        report.stage_s, report.wall_s = stage_s, time.perf_counter() - t_start
        _fill_extra(job, report)
        write_run_row(store, job.embed, report, started_at, kind="refresh")
        _event("refresh failed", report.run_id, logging.ERROR, reason=report.extra["reason"])


def _fill_extra(job: RefreshJob, report: RefreshReport) -> None:
    report.extra.update(
        plan=report.plan, deleted=report.deleted, metadata_updated=report.metadata_updated, chunks=report.chunks,
        garbage_rows=report.garbage_rows, maintenance=report.maintenance, refresh_args=job.public_args(),
        samples=report.samples,
    )  # fmt: skip


def _run_locked(job: RefreshJob, store: Store | None, lease: StoreLock | None, run_id: str, report: RefreshReport,
                stage_s: dict[str, float], t_start: float, started_at: dt.datetime,
                progress: bool = False) -> RefreshReport:  # fmt: skip
    ej = job.embed
    t0 = time.perf_counter()
    rows, rejected, _catalog_meta = _catalog_rows(ej)
    stage_s["catalog"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = _model_info(ej)
    report.model_id, report.settings_id = info.model_id, info.settings_id
    stage_s["model_probe"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tracks_ds, stored = _read_stored(store) if store is not None else (None, None)
    meta_cols = stored_metadata_columns(tracks_ds.schema) if tracks_ds is not None else _catalog_meta
    dropped = [m for m in _catalog_meta if m not in meta_cols]
    if dropped:
        _event("catalog columns not in tracks.lance are ignored", run_id, logging.WARNING, columns=dropped)
    if store is not None:
        _check_schemas(store, info, meta_cols)
    versions = lookup_versions(rows, ej.storage_options or None, job.lookup_threads, job.lookup_ray_min_rows)
    stage_s["lookup"] = time.perf_counter() - t0
    delete_missing = job.delete_missing and ej.limit is None  # a --limit catalog is partial
    plan = make_plan(rows, stored, versions, info.settings_id, meta_cols, delete_missing,
                     present_ids=[r.track_id for r in rejected if r.track_id])  # fmt: skip
    plan.rejected = [{"track_id": r.track_id, "uri": r.uri, "stage": "catalog", "error_type": r.error_type,
                      "message": r.message} for r in rejected]  # fmt: skip
    report.plan, report.samples = plan.counts(), plan.samples(job.sample)
    report.tracks_total = len(rows) + len(rejected)
    _event("plan", run_id, **report.plan, settings_id=info.settings_id, dry_run=job.dry_run)
    error_rows: list[dict[str, Any]] = plan.rejected + plan.lookup_failed
    if job.dry_run:
        finish_report(report, error_rows, ej.max_error_rate)
        report.stage_s, report.wall_s = stage_s, time.perf_counter() - t_start
        return report
    assert store is not None and lease is not None
    failpoint("planned")
    if plan.stored_tracks and len(plan.removed) > job.max_delete_fraction * plan.stored_tracks:
        raise RefreshError(
            f"the plan deletes {len(plan.removed)} of {plan.stored_tracks} stored tracks (more than "
            f"--max-delete-fraction {job.max_delete_fraction}); is the catalog complete? Use --keep-missing, or "
            "raise --max-delete-fraction if this is intended"
        )

    c = _Ctx(job, store, run_id, report, lease, stage_s, error_rows)
    with c.timed("delete"):
        report.deleted = delete_tracks(c, plan.removed)
        report.metadata_updated = update_metadata(c, plan.metadata, meta_cols)
    if plan.removed or plan.metadata:
        _event(
            "deleted and updated", run_id, deleted=report.deleted, metadata_updated=report.metadata_updated
        )
    todo = plan.todo
    if todo:
        info = dataclasses.replace(info, gpus=_cluster_gpus(stage_s))
        configure_data_context(progress)  # the embed job's retry and shuffle settings
        embed_and_commit(c, todo, info, meta_cols)
    with c.timed("sweep"):
        report.garbage_rows, without_windows = sweep(store, lease)
    failpoint("swept")
    if any(report.garbage_rows.values()):
        _event("orphans swept", run_id, rows=report.garbage_rows)
    report.extra["tracks_without_windows"] = len(without_windows)
    if without_windows:
        _event("tracks without windows (a stale writer?): delete their rows and refresh", run_id,
               logging.WARNING, count=len(without_windows), sample=without_windows[: job.sample])  # fmt: skip
    if job.maintenance:
        with c.timed("maintenance"):
            report.maintenance = maintain(store, job.retention_days)
        _event("maintenance", run_id, tables=report.maintenance)
    failpoint("maintained")

    finish_report(report, error_rows, ej.max_error_rate)
    if error_rows:
        report.versions["errors"] = append_once(store, "errors", _error_table(error_rows, run_id), run_id)
    report.versions.update(
        {k: v for k, v in store.versions().items() if k in ("tracks", "windows", "frames")}
    )
    report.stage_s, report.wall_s = stage_s, time.perf_counter() - t_start
    _fill_extra(job, report)
    write_run_row(store, ej, report, started_at, kind="refresh")
    _event("refresh finished", run_id, status=report.status, **report.plan, embedded=report.tracks_ok,
           windows=report.windows, deleted=report.deleted, failed=report.tracks_failed,
           wall_s=round(report.wall_s, 3), x_realtime=round(report.x_realtime, 2), stage_s=report.stage_s,
           versions=report.versions)  # fmt: skip
    return report


def _cluster_gpus(stage_s: dict[str, float]) -> int:
    import ray

    t0 = time.perf_counter()
    ensure_ray()
    stage_s["ray_init"] = stage_s.get("ray_init", 0.0) + time.perf_counter() - t0
    return int(ray.cluster_resources().get("GPU", 0))
