"""The embed job: catalog -> decode/window (CPU actors) -> MusicFM (GPU actors) -> Lance store.

:func:`run_embed` is the whole job; ``jobs/embed_catalog.py`` only parses flags and calls it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import pyarrow as pa

from pipeline import schemas
from pipeline.audio import AudioLimits
from pipeline.catalog import RejectedRow, UriPolicy, read_catalog
from pipeline.inference import EmbedSettings, load_model, resolve_precision
from pipeline.storage import redacted
from pipeline.store import Store, in_lists, sql_str, write_parquet_small, write_parquet_table

log = logging.getLogger("musicfm.pipeline")

T = TypeVar("T")


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
    loudness_target_db: float | None = None
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
    max_row_chars: int = 65536
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
        if self.max_row_chars < 1:
            raise ValueError("--max-row-chars must be >= 1")
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
        return "\n".join(lines)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ---- fault tolerance: every retry/restart knob the job relies on, set explicitly (Ray Data's
# defaults have changed between releases). Per-record failures never reach these: the stages
# turn them into error rows. These cover worker *processes* dying (OOM kill, segfault, node loss).

#: Decode and model actors are restarted without limit when their process dies; a restart costs
#: one model load (model actors) and never loses rows: the batch in flight is retried.
ACTOR_MAX_RESTARTS = -1
#: A batch whose actor died is retried at most this many times, then the run fails (no hang).
ACTOR_MAX_TASK_RETRIES = 4
#: A track on which the decode worker died this many times becomes a ``WorkerCrashed`` error row
#: (must stay below ACTOR_MAX_TASK_RETRIES, so a poison file never fails the run).
DECODE_MAX_CRASHES = 2
#: Task-based steps (splitting, writing data files) are retried this often on worker death.
TASK_MAX_RETRIES = 4
#: Actors dying *during* ``__init__`` (e.g. OOM while loading the model) tolerated in a row per pool.
MAX_CONSECUTIVE_ACTOR_INIT_DEATHS = 3


def configure_data_context(progress: bool = True) -> Any:
    """Set the Ray Data context for a run (progress bars and every retry setting), return it."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    settings = {
        # an exception escaping a stage is a bug, not a flaky record: fail the run, do not retry
        "actor_task_retry_on_errors": False,
        "retried_map_errors": False,
        "max_map_retries": 0,
        "actor_init_retry_on_errors": False,
        # a block whose task failed is never dropped: the run fails instead (nothing lost silently)
        "max_errored_blocks": 0,
        "max_consecutive_actor_init_deaths": MAX_CONSECUTIVE_ACTOR_INIT_DEATHS,
    }
    for name, value in settings.items():
        if hasattr(ctx, name):  # older Ray releases lack some of them
            setattr(ctx, name, value)
    # the tracks groupby: Ray 2.60's default hash shuffle starts a pool of aggregator actors
    # (seconds per run, and CPUs reserved beside the decode pool); the sort-based shuffle runs as
    # plain tasks. Measured on the 200-track refresh benchmark: write stage 10.8 s -> 2.6 s.
    from ray.data.context import ShuffleStrategy

    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ctx


def actor_restarts(before: set[str] | None = None) -> dict[str, int]:
    """Restarts of this cluster's decode / model actors created after ``before`` (actor ids), from
    the GCS actor table; ``{}`` when it cannot be read. ``before=None``: all of them."""
    try:
        import ray._private.state  # the public state API needs the dashboard

        table = ray._private.state.actors()
    except Exception:
        return {}
    out = {"decode": 0, "model": 0}
    for aid, a in table.items():
        if before is not None and aid in before:
            continue
        name = str(a.get("ActorClassName") or "")
        kind = "decode" if "DecodeStage" in name else "model" if "EmbedStage" in name else None
        if kind:
            out[kind] += int(a.get("NumRestarts") or 0)
    return out


def stop_stage_actors(before: set[str]) -> int:
    """Kill this driver's Ray Data stage actors (``MapWorker``) created after ``before`` that are
    still alive; returns how many. Other jobs' actors on a shared cluster are never touched."""
    try:
        import ray
        import ray._private.state

        me = ray.get_runtime_context().get_job_id()
        table = ray._private.state.actors()
        core = ray._private.worker.global_worker.core_worker
    except Exception:
        return 0
    n = 0
    for aid, a in table.items():
        alive = a.get("State") != "DEAD" and aid not in before
        if alive and a.get("JobID") == me and str(a.get("ActorClassName") or "").startswith("MapWorker("):
            with contextlib.suppress(Exception):  # already gone
                core.kill_actor(ray.ActorID.from_hex(aid), True)
                n += 1
    return n


def _actor_ids() -> set[str]:
    try:
        import ray._private.state

        return set(ray._private.state.actors())
    except Exception:
        return set()


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
    else:  # never attach to some other cluster found on this machine: start our own
        ray.init(address="local", include_dashboard=False, **kwargs)


def _catalog_rows(job: EmbedJob) -> tuple[list[dict[str, Any]], list[RejectedRow], list[str]]:
    policy = (
        UriPolicy.for_catalog(job.catalog, job.allowed_prefixes)
        if not job.allowed_prefixes
        else UriPolicy(allowed_prefixes=tuple(job.allowed_prefixes))
    )
    entries, rejected = read_catalog(
        job.catalog,
        job.storage_options or None,
        limit=job.limit,
        policy=policy,
        max_row_chars=job.max_row_chars,
    )
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
    try:
        probe = load_model(
            job.checkpoint,
            job.stats,
            job.model_config,
            device="cpu",
            storage_options=job.storage_options or None,
        )
    except ValueError as e:  # CheckpointError lists one problem per line; the CLI prints one line
        if "\n" not in str(e):
            raise
        from pipeline.errors import one_line

        raise type(e)(one_line(str(e))) from None
    # "auto" precision follows the cluster: bf16 when it has GPUs, fp32 otherwise.
    precision = resolve_precision(job.precision, "cuda" if gpus > 0 else "cpu")
    settings = EmbedSettings(
        layers=job.layers,
        window_s=job.window_s,
        hop_s=job.hop_s,
        frames_hz=job.frames_hz,
        precision=precision,
        loudness_target_db=job.loudness_target_db,
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
    actor_restarts: dict[str, int] = field(default_factory=dict)


@dataclass
class EmbedStream:
    """The lazy decode -> model pipeline of :func:`embed_stream` and what its caller cleans up."""

    ds: Any  # ray.data.Dataset of embedded rows (kind window | error), not yet executed
    attempts_dir: str
    actors_before: set[str]

    def finish(self, failed: bool = False) -> dict[str, int]:
        """After the stream ran: remove the crash-marker scratch; actor restarts during the run.
        ``failed``: the stream was left early; stop its actors now (they hold the GPUs and CPUs
        the next run needs, and references kept by the exception would keep them alive)."""
        shutil.rmtree(self.attempts_dir, ignore_errors=True)
        restarts = actor_restarts(self.actors_before)
        if failed:
            stop_stage_actors(self.actors_before)
        return restarts


@dataclass(frozen=True)
class CpuModelPlan:
    """How model actors share a node's cores on a cluster without GPUs."""

    reserve: int  # CPUs each model actor reserves with Ray (scheduling)
    threads: int  # torch threads per model actor
    decode_niceness: int  # OS niceness of the decode actors


#: Decode actors run at this niceness when the model runs on CPU: the model's torch threads keep
#: the cores while they compute and the decoders fill the gaps (decoding is ~1 % of the CPU the
#: full-size model needs per audio second, so the model is the resource to keep busy).
CPU_DECODE_NICENESS = 10


def cpu_model_plan(decode_cpus: int, model_actors: int) -> CpuModelPlan:
    """Model actors on a cluster without GPUs: each reserves what the largest node has left beside
    the decode actors (the writer tasks reserve none), and runs torch on its share of all the
    node's cores, with the decoders niced below it. Without
    this a model actor's torch threads and the decoders fight for the same cores."""
    import ray

    node = int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1))
    actors = max(1, model_actors)
    return CpuModelPlan(
        reserve=max(0, (node - decode_cpus) // actors),  # 0: it can always be scheduled
        threads=max(1, node // actors),
        decode_niceness=CPU_DECODE_NICENESS,
    )


def embed_stream(
    rows: list[dict[str, Any]], job: EmbedJob, info: ModelInfo, model_stage: type | None = None
) -> EmbedStream:
    """Decode (CPU actor pool) and embed (model actor pool) catalog rows: a lazy Ray dataset.
    ``model_stage`` replaces :class:`pipeline.stages.EmbedStage` (same constructor; benchmarks)."""
    import ray

    from pipeline.stages import DecodeStage, EmbedStage

    model_args = dict(
        checkpoint=job.checkpoint,
        stats=job.stats,
        model_config=job.model_config,
        device="auto",  # CUDA when the actor has a GPU, else CPU
        storage_options=job.storage_options or None,
    )
    n_actors = job.gpu_actors or max(1, info.gpus)
    actors_before = _actor_ids()
    # per-run scratch for DecodeStage's crash markers (on each node that runs a decode actor)
    attempts_dir = os.path.join(tempfile.gettempdir(), "musicfm-decode-attempts", uuid.uuid4().hex)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * job.decode_cpus)))
    # max_restarts / max_task_retries go through **ray_remote_args, which Ray 2.60 marks deprecated
    # (removal planned for 2.64, with no named replacement yet): kept explicit on purpose.
    warnings.filterwarnings(
        "ignore", message=".*ray_remote_args.* is deprecated", module=r"pipeline\.(embed|refresh|streaming)"
    )
    cpu_plan = None if info.gpus > 0 else cpu_model_plan(job.decode_cpus, n_actors)
    decoded = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs=dict(
            settings=info.settings,
            limits=job.limits,
            storage_options=job.storage_options or None,
            decode_timeout_s=job.decode_timeout_s,
            attempts_dir=attempts_dir,
            max_crashes=DECODE_MAX_CRASHES,
            niceness=0 if cpu_plan is None else cpu_plan.decode_niceness,
        ),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=job.decode_cpus),
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )
    embedded = decoded.map_batches(
        model_stage or EmbedStage,
        fn_constructor_kwargs=dict(
            model_args=model_args,
            settings=info.settings,
            batch_size=job.batch_size,
            dim=info.dim,
            cpu_threads=None if cpu_plan is None else cpu_plan.threads,
        ),
        batch_size=job.batch_size,
        batch_format="pyarrow",
        num_gpus=1 if info.gpus > 0 else 0,
        num_cpus=1 if cpu_plan is None else cpu_plan.reserve,
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )
    return EmbedStream(embedded, attempts_dir, actors_before)


def add_worker_seconds(stage_s: dict[str, float], times: pa.Table | None) -> None:
    """Sum the per-window decode and model seconds of ``times`` into ``stage_s``."""
    if times is not None and times.num_rows:
        for col, key in (("decode_s", "decode_worker"), ("model_s", "model_worker")):
            stage_s[key] = stage_s.get(key, 0.0) + float(pa.compute.sum(times[col]).as_py() or 0.0)


def embed_rows(
    rows: list[dict[str, Any]], job: EmbedJob, info: ModelInfo, stage_s: dict[str, float]
) -> Embedded:
    """:func:`embed_stream`, materialized once; errors and timings gathered on the driver."""
    import ray

    t0 = time.perf_counter()
    stream = embed_stream(rows, job, info)
    embedded = stream.ds.materialize()
    restarts = stream.finish()
    stage_s["decode+model"] = stage_s.get("decode+model", 0.0) + time.perf_counter() - t0
    errs = embedded.map_batches(_errors_of, batch_format="pyarrow").take_all()
    failed_in_model = {e["track_id"] for e in errs if e["stage"] == "model"}
    ok = embedded.map_batches(_DropTracks(failed_in_model), batch_format="pyarrow")
    refs = ok.map_batches(_times_of, batch_format="pyarrow").to_arrow_refs()
    parts = [t for t in ray.get(refs) if t.num_rows]  # empty blocks may carry no schema
    times = pa.concat_tables(parts) if parts else None
    add_worker_seconds(stage_s, times)
    return Embedded(ok=ok, error_rows=errs, times=times, actor_restarts=restarts)


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


def finish_report(report: RunReport, error_rows: list[dict[str, Any]], max_error_rate: float) -> None:
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
    report.status = "ok" if report.error_rate <= max_error_rate else "failed"
    if report.status == "failed":
        report.extra["reason"] = f"error rate {report.error_rate:.3f} > --max-error-rate {max_error_rate}"


_AMBIGUOUS_WRITE = (
    "error sending request",
    "connection reset",
    "connection closed",
    "broken pipe",
    "timed out",
)


def is_ambiguous_write(e: BaseException) -> bool:
    """A store write whose connection broke: it may or may not have taken effect."""
    from lance.commit import CommitConflictError

    return (
        isinstance(e, OSError)
        and not isinstance(e, CommitConflictError)
        and any(s in str(e).lower() for s in _AMBIGUOUS_WRITE)
    )


def retry_write(what: str, write: Callable[[], T], landed: Callable[[], T | None] | None = None,
                tries: int = 5) -> T:  # fmt: skip
    """Run a store write, retried (with backoff) when its connection broke.

    object_store retries 5xx answers itself, but not a conditional PUT (a manifest) whose
    connection broke: the commit may or may not have happened. Idempotent writes (an Overwrite of
    the same files, a ``merge_insert`` of the same rows, a delete) are simply retried; for the
    others ``landed`` is asked first and returns the result if the earlier try did take effect.
    """
    for i in range(tries):
        try:
            return write()
        except OSError as e:
            if i + 1 >= tries or not is_ambiguous_write(e):
                raise
            log.warning("%s failed (%s); %sretrying", what, str(e).splitlines()[0][:200],
                        "checking, then " if landed else "")  # fmt: skip
            time.sleep(0.5 * 2**i)
            if landed is not None:
                got = landed()
                if got is not None:
                    return got
    raise AssertionError("unreachable")


def commit_overwrite(store: Store, name: str, schema: pa.Schema, fragments: list, tries: int = 5) -> int:
    """``store.commit(..., mode="overwrite")``, retried when the request may not have arrived
    (re-committing an Overwrite is safe either way: at worst one more version, same files)."""
    return retry_write(
        f"commit of {name}", lambda: store.commit(name, schema, fragments, mode="overwrite"), tries=tries
    )


def append_fragments_once(store: Store, name: str, schema: pa.Schema, fragments: list, tries: int = 5) -> int:
    """``store.commit(..., mode="append")``, retried when the connection broke; before a retry
    the table is read to see whether the fragments' data files are in it already (no double append)."""

    def landed() -> int | None:
        ds = store.open(name)
        if ds is None or not fragments:
            return None
        mine = {f.path for f in fragments[0].files}
        have = {f.path for fr in ds.get_fragments() for f in fr.metadata.files}
        return ds.version if mine & have else None

    return retry_write(
        f"commit of {name}", lambda: store.commit(name, schema, fragments, mode="append"), landed, tries
    )


def append_once(store: Store, name: str, data: pa.Table, run_id: str, tries: int = 5) -> int:
    """``store.write_small(name, data)`` (an append of rows carrying ``run_id``), retried when the
    commit's connection broke: before retrying, the table is read to see whether this run's rows
    landed after all, so a retry never appends them twice."""

    def landed() -> int | None:
        ds = store.open(name)
        if ds is not None and ds.count_rows(filter=f"run_id = {sql_str(run_id)}") >= data.num_rows > 0:
            return ds.version
        return None

    return retry_write(f"append to {name}", lambda: store.write_small(name, data), landed, tries)


class RunFailed(RuntimeError):
    """A run that stopped in its Ray phase; the message is one line with the root cause."""


def root_cause(exc: BaseException) -> str:
    """``"Type: message"`` of the innermost cause of ``exc``, one line, redacted.

    Ray's task errors carry the worker's traceback as text (the cause chain does not survive
    pickling), so the first ``SomethingError: message`` line of that text is the root cause.
    """
    import re

    from pipeline.errors import one_line, redact

    e: BaseException = exc
    for _ in range(20):  # follow the in-process chain (RayTaskError keeps the original in .cause)
        nxt = getattr(e, "cause", None)
        if not isinstance(nxt, BaseException):
            nxt = e.__cause__
        if not isinstance(nxt, BaseException) or nxt is e:
            break
        e = nxt
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$", text, re.MULTILINE)
    if m and "ray::" in text:
        found = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    else:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        found = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return one_line(redact(found), 500)


def check_output(output: str, storage_options: dict[str, Any] | None = None) -> None:
    """Raise ``ValueError`` (one line) at once when the store root cannot be written: an object
    store bucket that does not exist or cannot be reached, a local path that is not a writable
    directory. Transient storage errors are retried; nothing is created remotely."""
    from pipeline.catalog import _scrub, _with_retries, open_uri
    from pipeline.errors import FetchError, redact

    where = redact(output)
    if "://" in output and not output.startswith("file://"):
        scheme, rest = output.split("://", 1)
        bucket = rest.split("/", 1)[0]
        try:
            fs, _ = open_uri(output, dict(storage_options or {}))
            _with_retries(lambda: fs.info(bucket), f"{scheme}://{bucket}", storage_options=storage_options)
        except FetchError as e:
            msg = str(e)
            if msg.startswith("not found"):
                msg = "the bucket does not exist"
            raise ValueError(f"--output {where}: cannot use bucket {bucket!r}: {msg}") from None
        except Exception as e:
            raise ValueError(
                _scrub(
                    f"--output {where}: cannot use bucket {bucket!r}: {type(e).__name__}: {e}",
                    storage_options,
                )
            ) from None
        return
    path = output[len("file://") :] if output.startswith("file://") else output
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip("/")) or ("/" if path.startswith("/") else ".")
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--output {where}: {probe} is not a writable directory")


#: Tracks per chunk of the embed job's stream: the driver makes their ``tracks`` rows and writes
#: them as one data file as soon as the chunk is complete.
EMBED_CHUNK_TRACKS = 1000


def embed_into_lance(
    rows: list[dict[str, Any]],
    job: EmbedJob,
    info: ModelInfo,
    store: Store,
    meta_cols: Sequence[str],
    run_id: str,
    report: RunReport,
    stage_s: dict[str, float],
    model_stage: type | None = None,
) -> list[dict[str, Any]]:
    """Stream ``rows`` through decode -> model -> data-file writers (:mod:`pipeline.streaming`);
    the driver writes each chunk's ``tracks`` rows as a data file, then commits every table once,
    windows and frames before tracks (a track row never points at windows that are not there).
    Returns the error rows. Nothing is committed if the stream fails."""
    import lance

    from pipeline.streaming import stream_chunks, table_schema

    tracks_schema = schemas.tracks_schema(info.settings.layers, info.dim, meta_cols)
    pending: dict[str, list[Any]] = {"windows": [], "frames": [], "tracks": []}
    failed: set[str] = set()
    errors: list[dict[str, Any]] = []
    embedded_at = _now()

    def on_chunk(out: Any) -> None:
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
    report.audio_s = _audio_seconds(res.times)
    return errors


def run_embed(job: EmbedJob, progress: bool = True) -> RunReport:
    """Run the embed job end to end and return its report (also stored in ``runs``).

    The store's windows / frames / tracks tables are replaced as a whole (one Overwrite commit
    each; earlier versions stay readable until cleanup). Use the refresh job for incremental updates.
    """
    t_start = time.perf_counter()
    started_at = _now()
    run_id = job.run_id or new_run_id()
    stage_s: dict[str, float] = {}

    t0 = time.perf_counter()
    check_output(job.output, job.storage_options)  # fail in seconds, not after the whole run
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
    if rows and job.format == "lance":
        error_rows += embed_into_lance(rows, job, info, store, meta_cols, run_id, report, stage_s)
    elif rows:
        try:
            emb = embed_rows(rows, job, info, stage_s)
        except Exception as e:
            raise RunFailed(f"decode/embed failed, nothing was written: {root_cause(e)}") from e
        error_rows += emb.error_rows
        if emb.actor_restarts:
            report.extra["actor_restarts"] = emb.actor_restarts
        t0 = time.perf_counter()
        tables = table_datasets(emb, job, info, meta_cols, run_id, _now(), len(rows))
        for name, (ds, _schema) in tables.items():
            ds = ds.materialize()
            setattr(
                report, {"tracks": "tracks_ok", "windows": "windows", "frames": "frames"}[name], ds.count()
            )
            write_parquet_table(ds, job.output, name, job.storage_options, run_id)
        stage_s["write"] = time.perf_counter() - t0
        report.audio_s = _audio_seconds(emb.times)

    finish_report(report, error_rows, job.max_error_rate)
    err_tbl = _error_table(error_rows, run_id)
    if job.format == "lance":
        report.versions["errors"] = append_once(store, "errors", err_tbl, run_id)
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
        report.versions["runs"] = append_once(store, "runs", tbl, report.run_id)
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
        loudness_target_db=getattr(args, "loudness_target_db", None),
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
        max_row_chars=getattr(args, "max_row_chars", 65536),
    )
