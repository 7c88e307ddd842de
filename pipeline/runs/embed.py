"""The embed job: catalog -> decode/window (CPU actors) -> MusicFM (GPU actors) -> Lance store.

:func:`run_embed` is the whole job; ``jobs/embed_catalog.py`` only parses flags and calls it.
The one decode -> model -> writer pass is :func:`pipeline.flow.streaming.stream_chunks`;
``--format parquet`` exports the committed tables afterwards (:mod:`pipeline.runs.export`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pipeline import schemas
from pipeline.errors import RunFailed, root_cause
from pipeline.flow.runtime import configure_data_context
from pipeline.flow.streaming import ChunkOutput, stream_chunks, table_schema
from pipeline.io.objects import check_output
from pipeline.runs.model_info import ModelInfo, prepare_model
from pipeline.runs.plan import catalog_rows
from pipeline.runs.report import (
    RunReport,
    audio_seconds,
    error_table,
    finish_report,
    new_run_id,
    write_run_row,
)
from pipeline.runs.settings import EmbedJob
from pipeline.store.commits import append_once, commit_overwrite, retry_write
from pipeline.store.tables import StoreWriter, in_lists

#: Tracks per chunk of the embed job's stream: the driver makes their ``tracks`` rows and writes
#: them as one data file as soon as the chunk is complete.
EMBED_CHUNK_TRACKS = 1000


def embed_into_lance(
    rows: list[dict[str, Any]],
    job: EmbedJob,
    info: ModelInfo,
    store: StoreWriter,
    meta_cols: Sequence[str],
    run_id: str,
    report: RunReport,
    stage_s: dict[str, float],
    model_stage: type | None = None,
) -> list[dict[str, Any]]:
    """Stream ``rows`` through decode -> model -> data-file writers (:mod:`pipeline.flow.streaming`);
    the driver writes each chunk's ``tracks`` rows as a data file, then commits every table once,
    windows and frames before tracks (a track row never points at windows that are not there).
    Returns the error rows. Nothing is committed if the stream fails."""
    import lance

    tracks_schema = schemas.tracks_schema(info.settings.layers, info.dim, meta_cols)
    pending: dict[str, list[Any]] = {"windows": [], "frames": [], "tracks": []}
    failed: set[str] = set()
    errors: list[dict[str, Any]] = []
    embedded_at = schemas.utc_now()

    def on_chunk(out: ChunkOutput) -> None:
        pending["windows"] += out.fragments["windows"]
        pending["frames"] += out.fragments["frames"]
        errors.extend(out.error_rows)
        failed.update(out.failed)
        if out.tracks.num_rows:
            pending["tracks"] += lance.fragment.write_fragments(
                out.tracks, store.uri("tracks"), schema=tracks_schema, storage_options=store.lance_options
            )
            report.tracks_ok += out.tracks.num_rows
            report.windows += out.times.num_rows

    try:
        res = stream_chunks(
            rows,
            job,
            info,
            store,
            run_id,
            meta_cols,
            EMBED_CHUNK_TRACKS,
            on_chunk,
            stage_s,
            embedded_at,
            model_stage=model_stage,
        )
    except Exception as e:
        what = "writing the store" if "ChunkWriter" in str(e) or isinstance(e, OSError) else "decode/embed"
        raise RunFailed(
            f"{what} failed before any commit (the previous version is intact): {root_cause(e)}"
        ) from e
    if res.restarts:
        report.extra["actor_restarts"] = res.restarts
    t0 = time.perf_counter()
    names = ["windows", "frames"] if info.settings.frames_hz else ["windows"]
    for name in names:  # dependency order: tracks last
        report.versions[name] = commit_overwrite(store, name, table_schema(info, name), pending[name])
        if failed:  # tracks with a window that failed in the model: their other windows go too
            ds = store.open(name)
            for pred in in_lists("track_id", sorted(failed)):
                retry_write(f"delete from {name}", lambda ds=ds, pred=pred: ds.delete(pred))
            report.versions[name] = store.open(name).version
    report.versions["tracks"] = commit_overwrite(store, "tracks", tracks_schema, pending["tracks"])
    if info.settings.frames_hz:
        report.frames = store.open("frames").count_rows()
    stage_s["write"] = time.perf_counter() - t0
    report.audio_s = audio_seconds(res.times)
    return errors


def run_embed(job: EmbedJob, progress: bool = True) -> RunReport:
    """Run the embed job end to end and return its report (also stored in ``runs``).

    The store's windows / frames / tracks tables are replaced as a whole (one Overwrite commit
    each; earlier versions stay readable until cleanup). Use the refresh job for incremental
    updates. With ``format="parquet"`` the committed tables are then exported as
    ``TABLE.parquet/`` directories beside them.
    """
    t_start = time.perf_counter()
    started_at = schemas.utc_now()
    run_id = job.run_id or new_run_id()
    stage_s: dict[str, float] = {}

    t0 = time.perf_counter()
    check_output(job.output, job.storage_options)  # fail in seconds, not after the whole run
    rows, rejected, meta_cols = catalog_rows(job)
    stage_s["catalog"] = time.perf_counter() - t0
    info = prepare_model(job, stage_s)
    store = StoreWriter(job.output, job.storage_options)
    report = RunReport(
        run_id=run_id,
        status="running",
        tracks_total=len(rows) + len(rejected),
        model_id=info.model_id,
        settings_id=info.settings_id,
    )
    report.extra["random_weights"] = info.model_id.startswith("random-")
    configure_data_context(progress)

    error_rows: list[dict[str, Any]] = [
        {
            "track_id": r.track_id,
            "uri": r.uri,
            "stage": "catalog",
            "error_type": r.error_type,
            "message": r.message,
        }
        for r in rejected
    ]
    if rows:
        error_rows += embed_into_lance(rows, job, info, store, meta_cols, run_id, report, stage_s)

    finish_report(report, error_rows, job.max_error_rate)
    report.versions["errors"] = append_once(store, "errors", error_table(error_rows, run_id), run_id)
    report.stage_s = stage_s
    report.wall_s = time.perf_counter() - t_start
    write_run_row(store, job, report, started_at, kind="embed")
    if job.format == "parquet":
        from pipeline.runs.export import export_parquet

        t0 = time.perf_counter()
        report.extra["parquet"] = export_parquet(job.output, job.storage_options, run_id=run_id)
        stage_s["export"] = time.perf_counter() - t0
    return report
