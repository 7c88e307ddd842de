"""Run reports: what a run did (counts, audio hours, timings, errors), printed at the end and
stored as one row of ``runs.lance``; error rows into ``errors.lance``."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.exits import EXIT_ERROR_RATE, EXIT_FAILED, EXIT_OK
from pipeline.runs.settings import EmbedJob
from pipeline.store.commits import append_once
from pipeline.store.tables import Store


@dataclass
class RunReport:
    run_id: str
    status: str
    tracks_total: int = 0
    tracks_ok: int = 0
    tracks_failed: int = 0
    windows: int = 0
    frames: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    model_id: str = ""
    settings_id: str = ""
    versions: dict[str, int] = field(default_factory=dict)
    errors_by_type: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def x_realtime(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def busy_cores(self) -> float | None:
        """CPU seconds of the decode + model pass ÷ its wall seconds (the run's processes on this
        machine: every Ray worker of a local cluster), None when not measured."""
        cpu, wall = self.stage_s.get("decode+model_cpu"), self.stage_s.get("decode+model")
        return cpu / wall if cpu is not None and wall else None

    @property
    def error_rate(self) -> float:
        return self.tracks_failed / self.tracks_total if self.tracks_total else 0.0

    @property
    def exit_code(self) -> int:
        """The job's exit code for this report (:mod:`pipeline.exits`)."""
        if self.status == "ok":
            return EXIT_OK
        return EXIT_FAILED if self.extra.get("fault") else EXIT_ERROR_RATE

    def summary(self) -> str:
        lines = [
            f"run {self.run_id}: {self.status}",
            f"  tracks   {self.tracks_ok} ok, {self.tracks_failed} failed (of {self.tracks_total})",
            f"  windows  {self.windows}" + (f", frames {self.frames}" if self.frames else ""),
            f"  audio    {self.audio_s / 3600:.3f} h in {self.wall_s:.1f} s wall = {self.x_realtime:.1f}x realtime",
            "  stages   " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_s.items()),
            f"  model    {self.model_id}",
        ]
        if self.busy_cores is not None:
            lines.append(f"  cores    {self.busy_cores:.2f} busy in decode+model (CPU s ÷ wall)")
        restarts = self.extra.get("actor_restarts") or {}
        if any(restarts.values()):
            lines.append(
                "  restarts "
                + ", ".join(f"{k} {v}" for k, v in restarts.items())
                + " (dead workers replaced, their batches retried)"
            )
        if self.errors_by_type:
            lines.append(
                "  errors   " + ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_type.items()))
            )
        if self.extra.get("reason"):
            lines.append(f"  reason   {self.extra['reason']}")
        return "\n".join(lines)


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
    kind: str = "refresh"

    @property
    def already_stored(self) -> int:
        """Catalog tracks that were in the store already with these settings (not embedded again)."""
        return int(self.plan.get("unchanged", 0)) + int(self.plan.get("metadata", 0))

    def summary(self) -> str:
        if self.kind == "embed" and not self.dry_run:
            lines = super().summary().splitlines()
            lines[1] = (
                f"  tracks   {self.tracks_ok} embedded, {self.tracks_failed} failed, {self.already_stored} "
                f"already in the store (of {self.tracks_total}); {self.chunks} chunk(s) committed"
            )
            if self.deleted:
                lines.insert(2, f"  deleted  {self.deleted} tracks no longer in the catalog")
            if self.extra.get("lease_taken_over"):
                lines.append(f"  lease    taken over from {self.extra['lease_taken_over']}")
            return "\n".join(lines)
        p = self.plan
        lines = [
            f"refresh {self.run_id}: {self.status}" + (" (dry run: nothing written)" if self.dry_run else ""),
            "  plan     " + ", ".join(f"{k} {v}" for k, v in p.items()),
        ]
        if "object_requests" in self.extra:
            lines.append(
                f"  lookups  {self.extra['object_requests']} object-store requests (LIST pages + HEADs)"
            )
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


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def finish_report(report: RunReport, error_rows: list[dict[str, Any]], max_error_rate: float) -> None:
    """Count the errors and decide the status: "failed" when the error rate is over
    ``max_error_rate``, when every track of the catalog failed (none is good, in the store or
    from this run), or when most windows that reached the model came out non-finite (a broken
    checkpoint or device: a fault of the system, exit 1)."""
    # one failure per (track, uri): a model failure gives one row per window; an unparsable
    # catalog row has neither, so each such row counts on its own
    report.tracks_failed = len(
        {
            (e.get("track_id"), e.get("uri")) if e.get("track_id") or e.get("uri") else ("row", i)
            for i, e in enumerate(error_rows)
        }
    )
    for e in error_rows:
        report.errors_by_type[e["error_type"]] = report.errors_by_type.get(e["error_type"], 0) + 1
    good = report.tracks_ok + int(getattr(report, "already_stored", 0))
    non_finite = report.errors_by_type.get("non_finite_output", 0)
    reason = None
    if non_finite and non_finite > report.windows:
        reason = (
            f"the model produced NaN/Inf for {non_finite} windows ({report.windows} good): the checkpoint "
            "or the device is broken"
        )
        report.extra["fault"] = True
    elif report.error_rate > max_error_rate:
        reason = f"error rate {report.error_rate:.3f} > --max-error-rate {max_error_rate}"
    elif report.tracks_failed and not good:
        reason = f"every track failed ({report.tracks_failed} of {report.tracks_total})"
    report.status = "failed" if reason else "ok"
    if reason:
        report.extra["reason"] = reason


def error_table(rows: Sequence[dict[str, Any]], run_id: str) -> pa.Table:
    now = schemas.utc_now()
    return pa.Table.from_pylist(
        [
            {
                "track_id": r.get("track_id"),
                "uri": r.get("uri"),
                "stage": r.get("stage") or "unknown",
                "error_type": r.get("error_type") or "Error",
                "message": r.get("message") or "",
                "run_id": run_id,
                "recorded_at": now,
            }
            for r in rows
        ],
        schema=schemas.ERRORS_SCHEMA,
    )


def audio_seconds(times_tbl: pa.Table | None) -> float:
    """Audio duration of the tracks embedded in this run (window rows carry each track's duration)."""
    if times_tbl is None or times_tbl.num_rows == 0:
        return 0.0
    firsts = times_tbl.filter(pa.compute.equal(times_tbl["window_ix"], 0))
    return float(pa.compute.sum(firsts["duration_s"]).as_py() or 0.0)


def write_run_row(store: Store, job: EmbedJob, report: RunReport, started_at: dt.datetime, kind: str) -> None:
    row = {
        "run_id": report.run_id,
        "kind": kind,
        "status": report.status,
        "started_at": started_at,
        "finished_at": schemas.utc_now(),
        "args_json": json.dumps(job.public_args(), default=str),
        "model_id": report.model_id,
        "settings_id": report.settings_id,
        "tracks_ok": report.tracks_ok,
        "tracks_failed": report.tracks_failed,
        "windows": report.windows,
        "audio_hours": report.audio_s / 3600,
        "wall_s": report.wall_s,
        "x_realtime": report.x_realtime,
        "stage_times_json": json.dumps(report.stage_s),
        "report_json": json.dumps(
            {
                "versions": report.versions,
                "errors_by_type": report.errors_by_type,
                "frames": report.frames,
                **report.extra,
            },
            default=str,
        ),
    }
    tbl = pa.Table.from_pylist([row], schema=schemas.RUNS_SCHEMA)
    report.versions["runs"] = append_once(store, "runs", tbl, report.run_id)
