"""Nightly catalog refresh: incremental, atomic per chunk, resumable, one writer at a time.

:func:`run_refresh` brings an embedding store in line with a catalog without redoing what is
already there. It shares the embed job's steps (catalog reading, model probe, the one streaming
pass of :mod:`pipeline.flow.streaming`) and adds:

Plan (:func:`pipeline.runs.decide.decide`: on the driver, :func:`pipeline.runs.plan.driver_plan`, or
per hash partition of a distributed join for large catalogs, :mod:`pipeline.runs.ray_plan`: ``--planner``)
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
    :class:`pipeline.store.lease.StoreLock`: a lease in ``_refresh_lock.lance`` taken and renewed by Lance conditional
    commits (an ``Overwrite`` based on the version read, committed without retry: of two writers
    that read the same version exactly one commits, on S3 through Lance's put-if-absent of the
    manifest). A second refresh fails fast with :class:`RefreshLocked`, or waits ``lock_wait_s``.

Maintenance (after the changes; :mod:`pipeline.store.maintenance`)
    Compaction of small fragments, index optimisation where a table has indices, and removal of
    versions older than ``retention_days``. Everything, with the version pins of each table, is
    recorded in the ``runs.lance`` row (``kind="refresh"``).

Test hooks: ``MUSICFM_FAIL_AT`` / ``MUSICFM_KILL_AT`` raise or SIGKILL at a named step
(:mod:`pipeline.faults`), to test what a crash there leaves and that reruns converge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import schemas, signals
from pipeline.engine.model_info import ModelInfo
from pipeline.errors import CatalogError, InjectedFailure, PipelineError, RefreshError, RunFailed, root_cause
from pipeline.faults import failpoint
from pipeline.flow.runtime import (
    cluster_gpus,
    configure_data_context,
    driver_identity,
    ensure_ray,
    ray_job_ended,
)
from pipeline.flow.streaming import ChunkOutput, TodoRows, stream_chunks, table_schema
from pipeline.runs.model_info import describe_job_model, load_probe, model_info_for_plan, precision_gpus
from pipeline.runs.plan import (
    PLAN_KINDS,
    catalog_policy,
    catalog_table,
    check_schemas,
    driver_plan,
    has_new_tracks,
    read_stored,
)
from pipeline.runs.ray_plan import find_orphans_ray, ray_plan, use_ray_plan
from pipeline.runs.report import (
    RefreshReport,
    audio_seconds,
    error_table,
    finish_report,
    new_run_id,
    write_run_row,
)
from pipeline.runs.settings import EmbedJob, RefreshJob
from pipeline.store.commits import append_fragments_once, append_once, delete_rows, merge_tracks, retry_write
from pipeline.store.lease import StoreLock
from pipeline.store.maintenance import maintain, sweep
from pipeline.store.snapshots import pin_for_search, publish
from pipeline.store.tables import Store, in_list, in_lists, sql_str

log = logging.getLogger("musicfm.refresh")


def _event(msg: str, run_id: str, level: int = logging.INFO, **fields: Any) -> None:
    """One log event; with ``--log-format json`` one JSON line carrying ``fields``."""
    fields = {"run_id": run_id, **fields}
    log.log(level, msg + "".join(f" {k}={v}" for k, v in fields.items() if not isinstance(v, dict | list)),
            extra={"fields": {"step": msg, **fields}})  # fmt: skip


def _batches(values: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(values), n):
        yield values[i : i + n]


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
        n += delete_rows(ds, pred)
    failpoint("tracks_deleted")
    for name in ("frames", "windows"):  # frames first: frames rows never outlive their windows rows
        tds = c.store.open(name)
        if tds is None:
            continue
        for pred in in_lists("track_id", ids):
            c.lease.check()
            delete_rows(tds, pred)
    return n


def update_metadata(c: _Ctx, batches: Iterable[Sequence[Mapping[str, Any]]], meta_cols: Sequence[str]) -> int:
    """Metadata-only changes (catalog rows, a batch at a time): rewrite those track rows with the
    catalog's values (same run_id, same vectors, so their windows stay valid). No model work."""
    n = 0
    for ci, part in enumerate(batches):
        ids = [r["track_id"] for r in part]
        new_meta = {r["track_id"]: json.loads(r.get("metadata_json") or "{}") for r in part}
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
    c: _Ctx,
    todo: Sequence[Mapping[str, Any]] | TodoRows,
    info: ModelInfo,
    meta_cols: Sequence[str],
    model_stage: type | None = None,
) -> None:
    """Embed every track to do in one streaming Ray pass (:func:`pipeline.flow.streaming.stream_chunks`)
    and commit it chunk by chunk as each chunk's tracks come out of the stream (decode and model
    keep running while the driver commits), in the order of the commit protocol (:func:`commit_chunk`).
    One pass means one actor-pool start (one model load per actor) however many chunks there are."""

    def commit(out: ChunkOutput) -> None:
        with signals.commit_section():  # a SIGTERM lets this chunk's commit finish first
            commit_chunk(c, out, info)

    signals.reassert()  # Ray may have started in the model-probe thread
    try:
        res = stream_chunks(
            todo if isinstance(todo, TodoRows) else list(todo), c.job.embed, info, c.store, c.run_id, meta_cols, c.job.chunk_size,
            commit, c.stage_s, model_stage=model_stage,
        )  # fmt: skip
    except (InjectedFailure, RefreshError, KeyboardInterrupt):
        raise
    except Exception as e:
        what = "writing the store" if "ChunkWriter" in str(e) or isinstance(e, OSError) else "decode/embed"
        where = (
            "before any commit (the previous version is intact)"
            if c.report.chunks == 0
            else f"after {c.report.chunks} committed chunk(s) (the same command resumes from there)"
        )
        raise RunFailed(f"{what} failed {where}: {root_cause(e)}") from e
    c.report.extra["actor_restarts"] = res.restarts
    c.report.extra["actors"] = res.actors
    c.report.audio_s = audio_seconds(res.times)


def commit_chunk(c: _Ctx, out: ChunkOutput, info: ModelInfo) -> None:
    """One chunk of the commit protocol: windows/frames append, tracks merge, superseded delete.
    This run's rows of failed tracks (a window failed in the model) are left to the sweep."""
    store, run_id = c.store, c.run_id
    failpoint("chunk_written", out.ix)
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
            merge_tracks(store, out.tracks)
        failpoint("tracks_merged", out.ix)
        for name in ("frames", "windows"):  # (3) the superseded rows of those tracks, frames first
            ds = store.open(name)
            if ds is None or not ids:
                continue
            for pred in in_lists("track_id", ids):
                c.lease.check()
                delete_rows(ds, f"{pred} AND run_id != {sql_str(run_id)}")
    c.report.tracks_ok += len(ids)
    c.report.windows += out.times.num_rows
    c.report.frames += sum(f.physical_rows for f in out.fragments["frames"])
    c.report.chunks += 1
    _event("chunk committed", run_id, chunk=out.ix, tracks=len(ids), failed=len(out.failed),
           embedded_total=c.report.tracks_ok, versions=store.versions())  # fmt: skip
    failpoint("chunk_done", out.ix)


def run_refresh(job: RefreshJob, progress: bool = False, model_stage: type | None = None) -> RefreshReport:
    """Run a refresh (or plan one with ``dry_run``) and return its report, also stored in
    ``runs.lance`` (``kind="refresh"``) unless dry.

    Raises:
        RefreshLocked: another refresh holds the store (nothing was written).
        RefreshError: the settings would change a table schema, or the plan deletes more than
            ``max_delete_fraction`` of the store (nothing was written).
    """
    t_start, started_at = time.perf_counter(), schemas.utc_now()
    run_id = job.embed.run_id or new_run_id()
    stage_s: dict[str, float] = {}
    report = RefreshReport(run_id=run_id, status="running", dry_run=job.dry_run, kind=job.kind)
    local_missing = "://" not in job.store and not os.path.isdir(job.store)
    if job.dry_run and local_missing:
        store = None  # nothing to read, and a dry run creates nothing
    else:
        store = Store(job.store, job.embed.storage_options)
    if os.environ.get("RAY_ADDRESS") and not job.dry_run:
        ensure_ray()  # on a cluster: the lease records this driver's Ray job (see holder_gone)
    lease = (
        StoreLock(
            store,
            run_id,
            job.lock_ttl_s,
            job.lock_wait_s,
            holder_info=driver_identity(),
            is_dead=ray_job_ended,
            break_lease=job.break_lease,
        )  # fmt: skip
        if store is not None and not job.dry_run
        else None
    )
    if lease is not None:
        t0 = time.perf_counter()
        try:
            lease.acquire()
        except OSError as e:  # an unreachable or full store: one line, nothing changed
            raise RunFailed(f"cannot take the store's lease (nothing was written): {root_cause(e)}") from e
        stage_s["lock"] = time.perf_counter() - t0
        _event("lock acquired", run_id, store=job.store, ttl_s=job.lock_ttl_s)
        if lease.took_over:
            report.extra["lease_taken_over"] = lease.took_over
    try:
        failpoint("lock_acquired")
        return _run_locked(
            job, store, lease, run_id, report, stage_s, t_start, started_at, progress, model_stage
        )
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
        write_run_row(store, job.embed, report, started_at, kind=job.kind)
        _event("refresh failed", report.run_id, logging.ERROR, reason=report.extra["reason"])


def _fill_extra(job: RefreshJob, report: RefreshReport) -> None:
    report.extra.update(
        plan=report.plan, already_stored=report.already_stored, deleted=report.deleted, metadata_updated=report.metadata_updated, chunks=report.chunks,
        garbage_rows=report.garbage_rows, maintenance=report.maintenance, refresh_args=job.public_args(),
        samples=report.samples,
    )  # fmt: skip


class _Probe:
    """:func:`pipeline.runs.model_info.load_probe` in a thread (it needs no Ray, so it overlaps the
    cluster's start); :meth:`result` gives the :class:`ModelInfo` or raises the load's error."""

    def __init__(self, job: EmbedJob) -> None:
        import threading

        self._job = job
        self._out: dict[str, Any] = {}

        def run() -> None:
            try:
                self._out["model"] = load_probe(job)
            except BaseException as e:  # re-raised in the caller's thread
                self._out["error"] = e

        self._thread = threading.Thread(target=run, name="musicfm-model-probe", daemon=True)
        self._thread.start()

    def result(self) -> ModelInfo:
        """The model's info once loaded (the cluster's GPUs resolve ``--precision auto``)."""
        gpus = precision_gpus(self._job)  # starts Ray (if still needed) while the load may go on
        self._thread.join()
        if "error" in self._out:
            raise self._out["error"]
        return describe_job_model(self._job, self._out.pop("model"), gpus)


@dataclass
class Planned:
    """A plan as :func:`_run_locked` applies it, made on the driver or with Ray."""

    planner: str  # "driver" | "ray"
    info: ModelInfo
    meta_cols: list[str]  # the metadata columns of tracks.lance
    counts: dict[str, int]
    samples: dict[str, list[str]]
    stored_tracks: int
    tracks_total: int
    requests: int  # object-store requests made for versions
    error_rows: list[dict[str, Any]]  # rejected and lookup_failed rows
    removed: Callable[[], Iterator[list[str]]]  # ids to delete, a batch at a time
    metadata: Callable[[], Iterator[list[dict[str, Any]]]]  # catalog rows, a batch at a time
    todo: Sequence[Mapping[str, Any]] | TodoRows


def _store_meta(store: Store | None, catalog_meta: Sequence[str], run_id: str) -> list[str]:
    """The metadata columns the refresh writes: the store's (catalog columns it lacks are
    ignored, with a warning), or the catalog's for a new store."""
    tracks_ds = store.open("tracks") if store is not None else None
    if tracks_ds is None:
        return list(catalog_meta)
    meta_cols = schemas.metadata_columns(tracks_ds.schema)
    dropped = [m for m in catalog_meta if m not in meta_cols]
    if dropped:
        _event("catalog columns not in tracks.lance are ignored", run_id, logging.WARNING, columns=dropped)
    return meta_cols


def plan_on_driver(job: RefreshJob, store: Store | None, run_id: str, delete_missing: bool,
                    stage_s: dict[str, float]) -> Planned:  # fmt: skip
    """The plan made on the driver (:func:`pipeline.runs.plan.driver_plan`): catalog rows and the
    stored projection as Arrow in this process."""
    ej = job.embed
    t0 = time.perf_counter()
    catalog, catalog_meta = catalog_table(ej)
    stage_s["catalog"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The model probe (torch import and one model load on this driver) runs in a thread while
    # this one reads the store and, when there is certainly work for Ray, starts or joins the
    # cluster: both mostly wait (on imports and file reads there, on Ray's daemons here).
    probe = _Probe(ej)
    t1 = time.perf_counter()
    _, stored = read_stored(store) if store is not None else (None, None)
    read_s, ray_s = time.perf_counter() - t1, 0.0
    if not job.dry_run and has_new_tracks(catalog, stored):
        t1 = time.perf_counter()
        ensure_ray()  # a new track is embedded whatever the plan says: start Ray meanwhile
        ray_s = time.perf_counter() - t1
        stage_s["ray_init"] = stage_s.get("ray_init", 0.0) + ray_s
    info = probe.result()
    stage_s["model_probe"] = time.perf_counter() - t0 - read_s - ray_s  # what it added to the run
    t0 = time.perf_counter() - read_s
    meta_cols = _store_meta(store, catalog_meta, run_id)
    if store is not None:
        check_schemas(store, info, meta_cols)
    plan = driver_plan(catalog, stored, info.settings_id, meta_cols, delete_missing, ej.storage_options or None,
                       job.lookup_threads, job.lookup_ray_min_rows)  # fmt: skip
    stage_s["lookup"] = time.perf_counter() - t0
    removed, metadata = sorted(plan.removed), plan.metadata
    size = job.chunk_size
    return Planned(
        "driver", info, meta_cols, plan.counts(), plan.samples(job.sample), plan.stored_tracks,
        catalog.num_rows, plan.requests, plan.rejected + plan.lookup_failed,
        removed=lambda: _batches(removed, 10_000),
        metadata=lambda: _batches(metadata, size),
        todo=plan.todo,
    )  # fmt: skip


def plan_with_ray(job: RefreshJob, store: Store | None, run_id: str, delete_missing: bool,
                   stage_s: dict[str, float]) -> Planned:  # fmt: skip
    """The plan made by Ray (:func:`pipeline.runs.ray_plan.ray_plan`): no catalog row, stored
    row or plan row is held by the driver, only counts, samples, error rows and chunk offsets."""
    ej = job.embed
    t0 = time.perf_counter()
    info = model_info_for_plan(ej)
    stage_s["model_probe"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tracks_ds = store.open("tracks") if store is not None else None
    store_meta = schemas.metadata_columns(tracks_ds.schema) if tracks_ds is not None else None
    if store is not None and store_meta is not None:
        check_schemas(store, info, store_meta)
    try:
        rp = ray_plan(job, store, info.settings_id, store_meta, delete_missing, catalog_policy(ej))
    except Exception as e:  # a task's error arrives wrapped by Ray: one line with its root cause
        if isinstance(e, PipelineError) and "ray::" not in str(e):
            raise
        cause = root_cause(e)
        if cause.startswith("CatalogError: "):
            raise CatalogError(cause.removeprefix("CatalogError: ")) from e
        raise RunFailed(f"planning failed (nothing was written): {cause}") from e
    stage_s["plan"] = time.perf_counter() - t0
    stage_s.update(rp.stage_s)
    meta_cols = _store_meta(store, rp.catalog_meta, run_id)
    if store is not None and store_meta is None:
        check_schemas(store, info, meta_cols)
    errors = [{k: r[k] for k in ("track_id", "uri", "stage", "error_type", "message")}
              for b in rp.rows(["rejected", "lookup_failed"]) for r in b]  # fmt: skip
    size = job.chunk_size
    return Planned(
        "ray", info, meta_cols, {k: rp.counts.get(k, 0) for k in PLAN_KINDS}, rp.samples, rp.stored_tracks,
        rp.tracks_total, rp.requests, errors,
        removed=lambda: ([r["track_id"] for r in b] for b in rp.rows(["removed"])),
        metadata=lambda: rp.rows(["metadata"], batch_rows=size),
        todo=TodoRows(rp.todo(size), rp.todo_count),
    )  # fmt: skip


def _run_locked(job: RefreshJob, store: Store | None, lease: StoreLock | None, run_id: str, report: RefreshReport,
                stage_s: dict[str, float], t_start: float, started_at: dt.datetime,
                progress: bool = False, model_stage: type | None = None) -> RefreshReport:  # fmt: skip
    ej = job.embed
    delete_missing = job.delete_missing and ej.limit is None  # a --limit catalog is partial
    if use_ray_plan(job):
        configure_data_context(progress)  # the same retry settings as the embed stream
        planned = plan_with_ray(job, store, run_id, delete_missing, stage_s)
    else:
        planned = plan_on_driver(job, store, run_id, delete_missing, stage_s)
    info, meta_cols = planned.info, planned.meta_cols
    report.model_id, report.settings_id = info.model_id, info.settings_id
    report.extra["object_requests"] = planned.requests
    report.extra["planner"] = planned.planner
    report.plan, report.samples = planned.counts, planned.samples
    report.tracks_total = planned.tracks_total
    _event(
        "plan",
        run_id,
        **report.plan,
        settings_id=info.settings_id,
        dry_run=job.dry_run,
        planner=planned.planner,
    )
    error_rows: list[dict[str, Any]] = planned.error_rows
    if job.dry_run:
        finish_report(report, error_rows, ej.max_error_rate)
        report.stage_s, report.wall_s = stage_s, time.perf_counter() - t_start
        return report
    assert store is not None and lease is not None
    if planned.counts["settings"] and pin_for_search(store):  # a model change: search stays whole
        report.extra["migration"] = "search pinned to the store before it until this run ends ok"
    failpoint("planned")
    removed = planned.counts["removed"]
    if planned.stored_tracks and removed > job.max_delete_fraction * planned.stored_tracks:
        raise RefreshError(
            f"the plan deletes {removed} of {planned.stored_tracks} stored tracks (more than "
            f"--max-delete-fraction {job.max_delete_fraction}); is the catalog complete? Use --keep-missing, or "
            "raise --max-delete-fraction if this is intended"
        )

    c = _Ctx(job, store, run_id, report, lease, stage_s, error_rows)
    with c.timed("delete"):
        report.deleted = sum(delete_tracks(c, ids) for ids in planned.removed())
        report.metadata_updated = update_metadata(c, planned.metadata(), meta_cols)
    if planned.counts["removed"] or planned.counts["metadata"]:
        _event(
            "deleted and updated", run_id, deleted=report.deleted, metadata_updated=report.metadata_updated
        )
    todo = planned.todo
    if (todo.count if isinstance(todo, TodoRows) else len(todo)) > 0:
        info = dataclasses.replace(info, gpus=cluster_gpus(stage_s))
        configure_data_context(progress)  # the embed job's retry and shuffle settings
        embed_and_commit(c, todo, info, meta_cols, model_stage)
    with c.timed("sweep"):
        found = find_orphans_ray(store) if planned.planner == "ray" else None  # a flat driver
        report.garbage_rows, without_windows, n_without = sweep(store, lease, found)
    failpoint("swept")
    if any(report.garbage_rows.values()):
        _event("orphans swept", run_id, rows=report.garbage_rows)
    report.extra["tracks_without_windows"] = n_without
    if without_windows:
        _event("tracks without windows (a stale writer?): delete their rows and refresh", run_id,
               logging.WARNING, count=n_without, sample=without_windows[: job.sample])  # fmt: skip
    if job.maintenance:
        with c.timed("maintenance"):
            report.maintenance = maintain(store, job.retention_days)
        _event("maintenance", run_id, tables=report.maintenance)
    failpoint("maintained")

    finish_report(report, error_rows, ej.max_error_rate)
    if error_rows or not store.exists("errors"):  # a store always has its (maybe empty) errors table
        report.versions["errors"] = append_once(store, "errors", error_table(error_rows, run_id), run_id)
    report.versions.update(
        {k: v for k, v in store.versions().items() if k in ("tracks", "windows", "frames")}
    )
    report.stage_s, report.wall_s = stage_s, time.perf_counter() - t_start
    _fill_extra(job, report)
    write_run_row(store, ej, report, started_at, kind=job.kind)
    if report.status == "ok":  # this run's versions become a snapshot; a migration switches here
        publish(store, run_id, job.keep_previous)
    _event("refresh finished", run_id, status=report.status, **report.plan, embedded=report.tracks_ok,
           windows=report.windows, deleted=report.deleted, failed=report.tracks_failed,
           wall_s=round(report.wall_s, 3), x_realtime=round(report.x_realtime, 2), stage_s=report.stage_s,
           versions=report.versions)  # fmt: skip
    return report
