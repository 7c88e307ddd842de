"""The embed job: catalog -> decode/window (CPU actors) -> MusicFM (GPU actors) -> Lance store.

:func:`run_embed` is the whole job; ``jobs/embed_catalog.py`` only parses flags and calls it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.audio import AudioLimits
from pipeline.catalog import RejectedRow, UriPolicy, read_catalog
from pipeline.inference import EmbedSettings, load_model, resolve_precision
from pipeline.storage import redacted
from pipeline.store import Store, write_parquet_small, write_parquet_table

log = logging.getLogger("musicfm.pipeline")


@dataclass(frozen=True)
class EmbedJob:
    """Everything one run needs; built from the command line by ``pipeline.cli``."""

    catalog: str
    output: str
    checkpoint: str = "msd"
    stats: str | None = None
    model_config: str | None = None
    layers: tuple[int, ...] = (7, 12)
    window_s: float = 30.0
    hop_s: float = 30.0
    frames_hz: float | None = None
    precision: str = "auto"
    batch_size: int = 8
    gpu_actors: int | None = None
    decode_cpus: int = 2
    format: str = "lance"
    limit: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    allowed_prefixes: tuple[str, ...] = ()
    limits: AudioLimits = AudioLimits()
    decode_timeout_s: float | None = 600.0
    max_error_rate: float = 1.0
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("lance", "parquet"):
            raise ValueError(f"--format must be lance or parquet, got {self.format!r}")
        if (
            self.batch_size < 1
            or self.decode_cpus < 1
            or (self.gpu_actors is not None and self.gpu_actors < 1)
        ):
            raise ValueError("--batch-size, --decode-cpus and --gpu-actors must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be >= 1")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError("--max-error-rate must be within [0, 1]")

    def public_args(self) -> dict[str, Any]:
        """Arguments as stored in ``runs.lance`` (secrets redacted)."""
        d = asdict(self)
        d["storage_options"] = redacted(self.storage_options)
        d["limits"] = asdict(self.limits)
        return d


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
    def error_rate(self) -> float:
        return self.tracks_failed / self.tracks_total if self.tracks_total else 0.0

    def summary(self) -> str:
        lines = [
            f"run {self.run_id}: {self.status}",
            f"  tracks   {self.tracks_ok} ok, {self.tracks_failed} failed (of {self.tracks_total})",
            f"  windows  {self.windows}" + (f", frames {self.frames}" if self.frames else ""),
            f"  audio    {self.audio_s / 3600:.3f} h in {self.wall_s:.1f} s wall = {self.x_realtime:.1f}x realtime",
            "  stages   " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_s.items()),
            f"  model    {self.model_id}",
        ]
        if self.errors_by_type:
            lines.append(
                "  errors   " + ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_type.items()))
            )
        return "\n".join(lines)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def ensure_ray(num_gpus_hint: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("LANCE_LOG", "error")  # workers inherit it; Lance warns on every new table
    kwargs: dict[str, Any] = {
        "configure_logging": True,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)


def _catalog_rows(job: EmbedJob) -> tuple[list[dict[str, Any]], list[RejectedRow], list[str]]:
    policy = (
        UriPolicy.for_catalog(job.catalog, job.allowed_prefixes)
        if not job.allowed_prefixes
        else UriPolicy(allowed_prefixes=tuple(job.allowed_prefixes))
    )
    entries, rejected = read_catalog(job.catalog, job.storage_options or None, limit=job.limit, policy=policy)
    meta_cols: list[str] = []
    for e in entries:
        for k in e.metadata:
            if k not in meta_cols:
                meta_cols.append(k)
    rows = [{"track_id": e.track_id, "uri": e.uri, "metadata_json": json.dumps(e.metadata)} for e in entries]
    return rows, rejected, meta_cols


def _error_table(rows: Sequence[dict[str, Any]], run_id: str) -> pa.Table:
    now = _now()
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


class _DropTracks:
    """Removes every row of the given tracks (tracks with a window that failed in the model)."""

    def __init__(self, track_ids: set[str]) -> None:
        self.track_ids = pa.array(sorted(track_ids), pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        keep = pa.compute.and_(
            pa.compute.equal(batch["kind"], "window"),
            pa.compute.invert(pa.compute.is_in(batch["track_id"], value_set=self.track_ids)),
        )
        return batch.filter(keep)


def _errors_of(batch: pa.Table) -> pa.Table:
    from pipeline.stages import only_kind

    return only_kind(batch, "error").select(["track_id", "uri", "stage", "error_type", "message"])


def _times_of(batch: pa.Table) -> pa.Table:
    from pipeline.stages import only_kind

    b = only_kind(batch, "window")
    return b.select(["track_id", "window_ix", "num_windows", "duration_s", "decode_s", "model_s"])


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learns about the model before the run (from one CPU load)."""

    model_id: str
    dim: int
    depth: int
    settings: EmbedSettings
    settings_id: str
    gpus: int


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def prepare_model(job: EmbedJob, stage_s: dict[str, float]) -> ModelInfo:
    """Start/connect Ray, load the model once on the driver (CPU) for its id and sizes."""
    import ray

    t0 = time.perf_counter()
    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    stage_s["ray_init"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = probe_model(job, gpus)
    stage_s["model_load"] = time.perf_counter() - t0
    return info


def probe_model(job: EmbedJob, gpus: int) -> ModelInfo:
    """Load the model once in this process (CPU) for its id, sizes and settings fingerprint.

    ``gpus`` is the cluster's GPU count (it resolves ``--precision auto``); needs no Ray.
    """
    probe = load_model(
        job.checkpoint, job.stats, job.model_config, device="cpu", storage_options=job.storage_options or None
    )
    # "auto" precision follows the cluster: bf16 when it has GPUs, fp32 otherwise.
    precision = resolve_precision(job.precision, "cuda" if gpus > 0 else "cpu")
    settings = EmbedSettings(
        layers=job.layers,
        window_s=job.window_s,
        hop_s=job.hop_s,
        frames_hz=job.frames_hz,
        precision=precision,
    )
    bad_layers = [i for i in job.layers if i > probe.config.encoder_depth]
    if bad_layers:
        raise ValueError(f"--layers {bad_layers} exceed the model depth {probe.config.encoder_depth}")
    return ModelInfo(
        model_id=probe.model_id,
        dim=probe.config.encoder_dim,
        depth=probe.config.encoder_depth,
        settings=settings,
        settings_id=settings.settings_id(probe.model_id),
        gpus=gpus,
    )


@dataclass
class Embedded:
    """Output of :func:`embed_rows`: good window rows (a Ray dataset), error rows, per-window timings."""

    ok: Any
    error_rows: list[dict[str, Any]]
    times: pa.Table | None


def embed_rows(
    rows: list[dict[str, Any]], job: EmbedJob, info: ModelInfo, stage_s: dict[str, float]
) -> Embedded:
    """Decode (CPU actor pool) and embed (model actor pool) catalog rows; materialized once."""
    import ray

    from pipeline.stages import DecodeStage, EmbedStage

    t0 = time.perf_counter()
    model_args = dict(
        checkpoint=job.checkpoint,
        stats=job.stats,
        model_config=job.model_config,
        device="auto",  # CUDA when the actor has a GPU, else CPU
        storage_options=job.storage_options or None,
    )
    n_actors = job.gpu_actors or max(1, info.gpus)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * job.decode_cpus)))
    decoded = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs=dict(
            settings=info.settings,
            limits=job.limits,
            storage_options=job.storage_options or None,
            decode_timeout_s=job.decode_timeout_s,
        ),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=job.decode_cpus),
    )
    embedded = decoded.map_batches(
        EmbedStage,
        fn_constructor_kwargs=dict(
            model_args=model_args, settings=info.settings, batch_size=job.batch_size, dim=info.dim
        ),
        batch_size=job.batch_size,
        batch_format="pyarrow",
        num_gpus=1 if info.gpus > 0 else 0,
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=n_actors),
    ).materialize()
    stage_s["decode+model"] = stage_s.get("decode+model", 0.0) + time.perf_counter() - t0
    errs = embedded.map_batches(_errors_of, batch_format="pyarrow").take_all()
    failed_in_model = {e["track_id"] for e in errs if e["stage"] == "model"}
    ok = embedded.map_batches(_DropTracks(failed_in_model), batch_format="pyarrow")
    refs = ok.map_batches(_times_of, batch_format="pyarrow").to_arrow_refs()
    parts = [t for t in ray.get(refs) if t.num_rows]  # empty blocks may carry no schema
    times = pa.concat_tables(parts) if parts else None
    if times is not None and times.num_rows:
        for col, key in (("decode_s", "decode_worker"), ("model_s", "model_worker")):
            stage_s[key] = stage_s.get(key, 0.0) + float(pa.compute.sum(times[col]).as_py() or 0.0)
    return Embedded(ok=ok, error_rows=errs, times=times)


def table_datasets(
    emb: Embedded,
    job: EmbedJob,
    info: ModelInfo,
    meta_cols: Sequence[str],
    run_id: str,
    embedded_at: dt.datetime,
    n_tracks: int,
) -> dict[str, tuple[Any, pa.Schema]]:
    """Ray datasets of the rows of each output table (windows, frames, tracks), with their schemas."""
    from pipeline.stages import ToFrames, ToTrack, ToWindows

    layers, dim, sid = info.settings.layers, info.dim, info.settings_id
    tables = {
        "windows": (
            emb.ok.map_batches(ToWindows(layers, dim, sid, run_id), batch_format="pyarrow"),
            schemas.windows_schema(layers, dim),
        )
    }
    if info.settings.frames_hz:
        tables["frames"] = (
            emb.ok.map_batches(
                ToFrames(layers, dim, info.settings.frames_hz, sid, run_id), batch_format="pyarrow"
            ),
            schemas.frames_schema(layers, dim),
        )
    tables["tracks"] = (
        emb.ok.groupby("track_id", num_partitions=max(1, min(64, n_tracks // 2000 + 1))).map_groups(
            ToTrack(layers, dim, meta_cols, info.model_id, sid, run_id, embedded_at).as_function(),
            batch_format="pyarrow",
        ),
        schemas.tracks_schema(layers, dim, meta_cols),
    )
    return tables


def write_fragments(
    store: Store, tables: dict[str, tuple[Any, pa.Schema]]
) -> dict[str, tuple[pa.Schema, list]]:
    """Write every table's data files in the workers; return (schema, fragments) per table (uncommitted)."""
    out = {}
    for name, (ds, schema) in tables.items():
        writer = ds.map_batches(store.fragment_writer(name, schema), batch_size=None, batch_format="pyarrow")
        out[name] = (schema, Store.collect_fragments(writer))
    return out


def finish_report(report: RunReport, error_rows: list[dict[str, Any]], max_error_rate: float) -> None:
    report.tracks_failed = len({(e.get("track_id"), e.get("uri")) for e in error_rows})
    for e in error_rows:
        report.errors_by_type[e["error_type"]] = report.errors_by_type.get(e["error_type"], 0) + 1
    report.status = "ok" if report.error_rate <= max_error_rate else "failed"
    if report.status == "failed":
        report.extra["reason"] = f"error rate {report.error_rate:.3f} > --max-error-rate {max_error_rate}"


def run_embed(job: EmbedJob, progress: bool = True) -> RunReport:
    """Run the embed job end to end and return its report (also stored in ``runs``).

    The store's windows / frames / tracks tables are replaced as a whole (one Overwrite commit
    each; earlier versions stay readable until cleanup). Use the refresh job for incremental updates.
    """
    import ray

    t_start = time.perf_counter()
    started_at = _now()
    run_id = job.run_id or new_run_id()
    stage_s: dict[str, float] = {}

    t0 = time.perf_counter()
    rows, rejected, meta_cols = _catalog_rows(job)
    stage_s["catalog"] = time.perf_counter() - t0
    info = prepare_model(job, stage_s)
    store = Store(job.output, job.storage_options)
    report = RunReport(
        run_id=run_id,
        status="running",
        tracks_total=len(rows) + len(rejected),
        model_id=info.model_id,
        settings_id=info.settings_id,
    )
    report.extra["random_weights"] = info.model_id.startswith("random-")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress

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
        emb = embed_rows(rows, job, info, stage_s)
        error_rows += emb.error_rows
        t0 = time.perf_counter()
        tables = table_datasets(emb, job, info, meta_cols, run_id, _now(), len(rows))
        if job.format == "parquet":
            for name, (ds, _schema) in tables.items():
                ds = ds.materialize()
                setattr(
                    report,
                    {"tracks": "tracks_ok", "windows": "windows", "frames": "frames"}[name],
                    ds.count(),
                )
                write_parquet_table(ds, job.output, name, job.storage_options, run_id)
        else:
            pending = write_fragments(store, tables)
            for name in ("windows", "frames", "tracks"):  # dependency order: tracks last
                if name in pending:
                    schema, frags = pending[name]
                    report.versions[name] = store.commit(name, schema, frags, mode="overwrite")
            report.tracks_ok = sum(f.physical_rows for f in pending["tracks"][1])
            report.windows = sum(f.physical_rows for f in pending["windows"][1])
            report.frames = sum(f.physical_rows for f in pending.get("frames", (None, []))[1])
        stage_s["write"] = time.perf_counter() - t0
        report.audio_s = _audio_seconds(emb.times)

    finish_report(report, error_rows, job.max_error_rate)
    err_tbl = _error_table(error_rows, run_id)
    if job.format == "lance":
        report.versions["errors"] = store.write_small("errors", err_tbl)
    elif err_tbl.num_rows:
        write_parquet_small(err_tbl, job.output, "errors", job.storage_options)
    report.stage_s = stage_s
    report.wall_s = time.perf_counter() - t_start
    write_run_row(store, job, report, started_at, kind="embed")
    return report


def _audio_seconds(times_tbl: pa.Table | None) -> float:
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
        "finished_at": _now(),
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
    if job.format == "lance":
        report.versions["runs"] = store.write_small("runs", tbl)
    else:
        write_parquet_small(tbl, job.output, f"runs-{report.run_id}", job.storage_options)


def job_from_args(args: Any) -> EmbedJob:
    """Build an :class:`EmbedJob` from parsed ``embed_catalog`` flags (ValueError on bad combinations)."""
    from pipeline.cli import window_settings

    window_s, hop_s, frames_hz = window_settings(args)
    return EmbedJob(
        catalog=args.catalog,
        output=args.output,
        checkpoint=args.checkpoint,
        stats=args.stats,
        model_config=args.model_config,
        layers=tuple(args.layers),
        window_s=window_s,
        hop_s=hop_s,
        frames_hz=frames_hz,
        precision=args.precision,
        batch_size=args.batch_size,
        gpu_actors=args.gpu_actors,
        decode_cpus=args.decode_cpus,
        format=args.format,
        limit=args.limit,
        storage_options=dict(args.storage_options or {}),
        allowed_prefixes=tuple(args.allowed_prefixes),
        limits=AudioLimits(
            max_bytes=int(args.max_file_mb * 1024 * 1024),
            max_duration_s=args.max_duration_s,
            max_channels=args.max_channels,
        ),
        decode_timeout_s=args.decode_timeout_s,
        max_error_rate=args.max_error_rate,
    )
