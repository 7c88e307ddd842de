"""The embed job: catalog -> decode/window (CPU actors) -> MusicFM (GPU actors) -> Lance store.

One engine: an embed is a refresh (:func:`pipeline.runs.refresh.run_refresh`) of the output
store with the embed job's settings. Into an empty store the plan is "all new"; the tracks
are committed chunk by chunk (``chunk_size`` tracks per commit, the refresh's commit protocol),
so a run killed at any point and started again with the same command skips what is committed
and redoes at most the chunks that were in flight. Into an existing store it embeds what is
new, changed or embedded with other settings, leaves what is already there, and deletes tracks
that are not in the catalog (the store follows the catalog, as it did when the embed job
replaced the tables). ``--format parquet`` exports the committed tables afterwards
(:mod:`pipeline.runs.export`).
"""

from __future__ import annotations

import dataclasses
import time

from pipeline.io.objects import check_output
from pipeline.runs.refresh import run_refresh
from pipeline.runs.report import RefreshReport
from pipeline.runs.settings import EmbedJob, RefreshJob


def embed_refresh_job(
    job: EmbedJob,
    chunk_size: int | None = None,
    break_lease: bool = False,
    planner: str | None = None,
    keep_previous: int | None = None,
) -> RefreshJob:
    """The refresh run that performs ``job``: every catalog track embedded (unless already in the
    store with these settings), tracks not in the catalog removed, committed per chunk
    (``chunk_size`` tracks per commit). A setting left None takes :class:`RefreshJob`'s default."""
    given = {"chunk_size": chunk_size, "planner": planner, "keep_previous": keep_previous}
    return RefreshJob(
        embed=dataclasses.replace(job, format="lance"),
        delete_missing=True,
        max_delete_fraction=1.0,  # an embed makes the store equal to the catalog, as asked
        break_lease=break_lease,
        kind="embed",
        **{k: v for k, v in given.items() if v is not None},
    )


def run_embed(
    job: EmbedJob,
    progress: bool = True,
    *,
    chunk_size: int | None = None,
    break_lease: bool = False,
    model_stage: type | None = None,
    planner: str | None = None,
    keep_previous: int | None = None,
) -> RefreshReport:
    """Run the embed job end to end and return its report (also stored in ``runs.lance`` with
    ``kind="embed"``). ``model_stage`` replaces the model stage (benchmarks); ``chunk_size``,
    ``planner`` and ``keep_previous`` left None take :class:`RefreshJob`'s defaults.

    Raises:
        ValueError: the output cannot be written (checked before anything runs).
        RefreshLocked: another run holds the store's lease (it is alive, or not proven gone).
        RefreshError: the settings change a table's schema (layers, model size) in place.
        RunFailed: the stream failed; the message says how many chunks were committed.
    """
    check_output(job.output, job.storage_options)  # fail in seconds, not after the whole run
    report = run_refresh(
        embed_refresh_job(job, chunk_size, break_lease, planner, keep_previous),
        progress,
        model_stage=model_stage,
    )
    if job.format == "parquet" and report.status == "ok":
        from pipeline.runs.export import export_parquet

        t0 = time.perf_counter()
        report.extra["parquet"] = export_parquet(job.output, job.storage_options, run_id=report.run_id)
        report.stage_s["export"] = time.perf_counter() - t0
    return report
