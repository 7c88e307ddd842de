"""One streaming Ray pass from catalog rows to uncommitted data files, handed over chunk by chunk.

Both jobs use it (an embed is a refresh of its output store): each chunk is committed as it
arrives, by the commit protocol of :mod:`pipeline.runs.refresh`.

    catalog rows (+ chunk index) ──DecodeStage (CPU actors)──▶ windows with audio | errors
        ──EmbedStage (GPU actors)──▶ windows with pooled vectors (and frames) | errors
        ──ChunkWriter (CPU actors)─▶ windows / frames data files, per chunk, written in the worker
        ──driver──▶ a chunk is complete when each of its tracks has all its windows (ok or failed
                    in the model) or its fetch/decode error: ``on_chunk(ChunkOutput)``

Nothing is materialized: blocks flow through the object store once, the actor pools start once
(one model load per actor) however many chunks there are, and the data files are written while
decoding and embedding go on. The driver holds, per incomplete chunk, the pooled window vectors
(no audio, no frames) it needs to make the chunk's ``tracks`` rows (token-weighted means).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import schemas
from pipeline.engine.device import CPU_DEFAULT_BATCH
from pipeline.engine.model_info import ModelInfo
from pipeline.errors import redact
from pipeline.flow.guard import check_finite_table
from pipeline.flow.job import FlowJob
from pipeline.flow.runtime import (
    ACTOR_MAX_RESTARTS,
    ACTOR_MAX_TASK_RETRIES,
    DECODE_MAX_CRASHES,
    PoolPlan,
    actor_ids,
    actor_restarts,
    actors_started,
    cpu_model_plan,
    decode_actor_bytes,
    default_cpu_model_actors,
    default_decode_cpus,
    largest_node_cpus,
    largest_node_memory,
    model_cost,
    plan_pools,
    pool_bounds,
    process_tree_cpu_s,
    stop_stage_actors,
    worker_runtime_env,
)
from pipeline.store.tables import Store

if TYPE_CHECKING:
    from ray.data import Dataset

#: Columns of the per-window timings kept for the run report.
TIME_COLUMNS = ["track_id", "window_ix", "num_windows", "duration_s", "decode_s", "model_s"]


@dataclass
class Chunk:
    """What the driver has received of one chunk from the stream, until every track is accounted for."""

    ix: int
    expected: int  # tracks in the chunk
    parts: list[pa.Table] = field(default_factory=list)  # window + error rows, no frames
    fragments: dict[str, list[Any]] = field(default_factory=lambda: {"windows": [], "frames": []})
    seen: dict[str, set[int]] = field(default_factory=dict)  # window_ix accounted for (ok or failed)
    done: set[str] = field(default_factory=set)

    def add(self, rows: pa.Table, windows: list[Any], frames: list[Any]) -> None:
        self.parts.append(rows)
        self.fragments["windows"] += windows
        self.fragments["frames"] += frames
        cols = [rows[k].to_pylist() for k in ("track_id", "kind", "window_ix", "num_windows")]
        for tid, kind, wix, n in zip(*cols, strict=True):
            if kind == "error" and wix is None:  # fetch/decode error: the track has no windows
                self.done.add(tid)
                continue
            got = self.seen.setdefault(tid, set())
            got.add(wix)
            if n is not None and len(got) >= n:
                self.done.add(tid)

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.expected


@dataclass
class ChunkOutput:
    """A complete chunk, ready to commit."""

    ix: int
    fragments: dict[str, list[Any]]  # uncommitted data files: windows, frames
    tracks: pa.Table  # tracks rows of the chunk's tracks that embedded fine
    times: pa.Table  # per-window timings of those tracks (TIME_COLUMNS)
    error_rows: list[dict[str, Any]]  # fetch / decode / model errors (+ tracks lost in the pipeline)
    failed: set[str]  # tracks with an error; their windows, if any, are in the fragments: delete them


@dataclass
class StreamResult:
    """What a whole pass leaves besides its chunks."""

    restarts: dict[str, int]  # decode / model actor restarts during the pass
    times: pa.Table | None  # per-window timings (TIME_COLUMNS) of every track embedded fine
    actors: dict[str, int] = field(default_factory=dict)  # decode / model actors the pools started


@dataclass
class TodoRows:
    """Rows to embed held by Ray, not by the driver: a dataset with the catalog row columns and
    ``chunk`` (chunk ``k`` holds ``min(chunk_size, count - k * chunk_size)`` rows)."""

    ds: Dataset
    count: int

    def rows_of_chunk(self, ix: int) -> list[dict[str, Any]]:
        """The rows of one chunk (read only for a chunk that did not come out of the stream)."""

        def pick(batch: pa.Table) -> pa.Table:
            return batch.filter(pa.compute.equal(batch["chunk"], ix))

        return self.ds.map_batches(pick, batch_size=None, batch_format="pyarrow").take_all()


def chunk_of(positions: np.ndarray, chunk_size: int) -> np.ndarray:
    """The one chunker: the chunk of each row to embed from its position among them (chunk ``k``
    holds positions ``k * chunk_size ...``), for the driver's rows (:func:`stream_chunks`) and
    the Ray plan's (:func:`pipeline.runs.ray_plan.todo_rows`)."""
    return np.asarray(positions, np.int64) // chunk_size


def chunk_len(ix: int, count: int, chunk_size: int) -> int:
    """Rows in chunk ``ix`` when :func:`chunk_of` cuts ``count`` rows (the last one may be short)."""
    return min(chunk_size, count - ix * chunk_size)


#: Rows per block of a :class:`TodoRows` dataset handed to the decode pool (a block goes to one
#: actor: small blocks spread the tracks over the pool).
TODO_ROWS_PER_BLOCK = 16


@dataclass
class EmbedStream:
    """The lazy decode -> model pipeline of :func:`embed_stream` and what its caller cleans up."""

    ds: Dataset  # of embedded rows (kind window | error), not yet executed
    attempts_dir: str
    actors_before: set[str]
    actors: dict[str, int] = field(default_factory=dict)  # stage actors started (after finish)

    def finish(self, failed: bool = False) -> dict[str, int]:
        """After the stream ran: remove the crash-marker scratch; actor restarts during the run.
        ``failed``: the stream was left early; stop its actors now (they hold the GPUs and CPUs
        the next run needs, and references kept by the exception would keep them alive)."""
        shutil.rmtree(self.attempts_dir, ignore_errors=True)
        restarts = actor_restarts(self.actors_before)
        self.actors = actors_started(self.actors_before)
        if failed:
            stop_stage_actors(self.actors_before)
        return restarts


def embed_stream(
    rows: list[dict[str, Any]] | Dataset,
    job: FlowJob,
    info: ModelInfo,
    decode_actors: tuple[int, int],
    model_actors: tuple[int, int],
    model_stage: type | None = None,
    pools: PoolPlan | None = None,
) -> EmbedStream:
    """Decode (a pool of ``decode_actors`` = (min, max) CPU actors) and embed (``model_actors``
    model actors; min < max autoscales with the work) catalog rows: a lazy Ray dataset. ``job`` (:class:`pipeline.flow.job.FlowJob`, e.g. a run's ``EmbedJob``) gives the model
    source, limits and batch size; ``info`` (:class:`pipeline.engine.model_info.ModelInfo`) the
    settings. ``model_stage`` replaces :class:`pipeline.flow.stages.EmbedStage` (benchmarks).
    ``pools`` (:func:`size_pools`): the memory each actor requests from Ray and the CPU batch size.
    ``rows``: a list of catalog rows, or a Ray dataset of them (:class:`TodoRows`)."""
    import ray

    from pipeline.flow.stages import DecodeStage, EmbedStage

    model_args = dict(
        checkpoint=job.checkpoint,
        stats=job.stats,
        model_config=job.model_config,
        device="auto",  # CUDA when the actor has a GPU, else CPU
        storage_options=job.storage_options or None,
    )
    actors_before = actor_ids()
    # per-run scratch for DecodeStage's crash markers (on each node that runs a decode actor)
    attempts_dir = os.path.join(tempfile.gettempdir(), "musicfm-decode-attempts", uuid.uuid4().hex)
    if isinstance(rows, list):
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * decode_actors[1])))
    else:
        ds = rows.repartition(target_num_rows_per_block=TODO_ROWS_PER_BLOCK)
    # max_restarts / max_task_retries go through **ray_remote_args, which Ray 2.60 marks deprecated
    # (removal planned for 2.64, with no named replacement yet): kept explicit on purpose.
    warnings.filterwarnings(
        "ignore", message=".*ray_remote_args.* is deprecated", module=r"pipeline\.flow\.streaming"
    )
    cpu_plan = None if info.gpus > 0 else cpu_model_plan(decode_actors[1], model_actors[1])
    worker_env = worker_runtime_env()  # decode and model actors alike
    batch = job.batch_size if pools is None else pools.batch_size
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
        **({"memory": pools.decode_memory} if pools else {}),
        compute=ray.data.ActorPoolStrategy(min_size=decode_actors[0], max_size=decode_actors[1]),
        runtime_env=worker_env,
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )
    embedded = decoded.map_batches(
        model_stage or EmbedStage,
        fn_constructor_kwargs=dict(
            model_args=model_args,
            settings=info.settings,
            batch_size=batch,  # None: the model actor sizes its batches from GPU memory
            dim=info.dim,
            cpu_threads=None if cpu_plan is None else cpu_plan.threads,
        ),
        batch_size=rows_per_model_call(batch, info.gpus),
        batch_format="pyarrow",
        num_gpus=1 if info.gpus > 0 else 0,
        num_cpus=1 if cpu_plan is None else cpu_plan.reserve,
        **({"memory": pools.model_memory} if pools else {}),
        compute=ray.data.ActorPoolStrategy(min_size=model_actors[0], max_size=model_actors[1]),
        runtime_env=worker_env,
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )
    return EmbedStream(embedded, attempts_dir, actors_before)


def size_pools(
    job: FlowJob, info: ModelInfo, work: int
) -> tuple[tuple[int, int], tuple[int, int], PoolPlan | None]:
    """(model actors, decode actors, memory plan) of a run of ``work`` tracks: the pool shape from
    the model loaded (its FLOPs per audio second give the torch threads per CPU actor), fitted to
    the largest node's memory (:func:`pipeline.flow.runtime.plan_pools`; raises ``ValueError`` in
    one line before any work when one model actor does not fit). ``--gpu-actors`` and
    ``--decode-cpus`` override the counts; the plan is None without the model's config."""
    from pipeline.flow.stages import DecodeStage

    settings = info.settings
    cost = None if info.config is None else model_cost(info.config, settings.window_s, settings.precision)
    # a small run (a quiet night) does not need every actor the cluster could hold
    model_max = job.gpu_actors or (info.gpus if info.gpus > 0 else default_cpu_model_actors(cost))
    decode_max = job.decode_cpus or default_decode_cpus(info.gpus, pool_bounds(None, model_max, work)[1])
    decode_actors = pool_bounds(job.decode_cpus_min if job.decode_cpus else 1, decode_max, work)
    if cost is None:
        return pool_bounds(job.gpu_actors_min, model_max, work), decode_actors, None
    decode_memory = decode_actor_bytes(
        settings.window_s, DecodeStage.WINDOWS_PER_BLOCK, DecodeStage.STREAM_ABOVE_S
    )
    pools = plan_pools(
        cost,
        pool_bounds(None, model_max, work)[1],
        min(decode_actors[1], largest_node_cpus()),
        decode_memory,
        job.batch_size,
        info.gpus,
        largest_node_memory(),
    )
    return pool_bounds(job.gpu_actors_min, pools.model_actors, work), decode_actors, pools


def add_worker_seconds(stage_s: dict[str, float], times: pa.Table | None) -> None:
    """Sum the per-window decode and model seconds of ``times`` into ``stage_s``."""
    if times is not None and times.num_rows:
        for col, key in (("decode_s", "decode_worker"), ("model_s", "model_worker")):
            stage_s[key] = stage_s.get(key, 0.0) + float(pa.compute.sum(times[col]).as_py() or 0.0)


#: Windows handed to a GPU model actor per call when ``--batch-size`` is not given: several model
#: batches, so that the copy of batch n+1 overlaps the compute of batch n inside one call.
GPU_ROWS_PER_CALL = 256


def rows_per_model_call(batch_size: int | None, gpus: int) -> int:
    """Rows per model-stage call: a multiple of the model batch on GPUs (overlap), else the batch."""
    if batch_size is None:
        return GPU_ROWS_PER_CALL if gpus > 0 else CPU_DEFAULT_BATCH
    return 4 * batch_size if gpus > 0 else batch_size


def track_rows(
    windows: pa.Table, info: ModelInfo, meta_cols: Sequence[str], run_id: str, embedded_at: dt.datetime
) -> pa.Table:
    """``tracks`` rows from embedded window rows (every window of each track, no frames), made on
    the driver by the ``ToTrack`` stage; a chunk is bounded, so its pooled vectors fit."""
    from pipeline.flow.stages import ToTrack

    to_track = ToTrack(
        info.settings.layers, info.dim, meta_cols, info.model_id, info.settings_id, run_id, embedded_at
    )
    if not windows.num_rows:
        return to_track.schema.empty_table()
    windows = windows.take(
        pa.compute.sort_indices(windows, [("track_id", "ascending"), ("window_ix", "ascending")])
    )
    ids = windows["track_id"].to_numpy(zero_copy_only=False)
    bounds = [0, *(np.flatnonzero(ids[1:] != ids[:-1]) + 1).tolist(), len(ids)]
    rows = [to_track(windows.slice(a, b - a)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    rows = [r for r in rows if r.num_rows]
    return pa.concat_tables(rows) if rows else to_track.schema.empty_table()


def finish_chunk(
    ch: Chunk,
    info: ModelInfo,
    meta_cols: Sequence[str],
    run_id: str,
    embedded_at: dt.datetime,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> ChunkOutput:
    """Errors, track rows and timings of a chunk. ``rows`` (the stream's input) is given for a
    chunk that never completed: its tracks not accounted for become error rows, not silence."""
    from pipeline.flow.stages import only_kind

    got = pa.concat_tables(ch.parts) if ch.parts else None
    errors = only_kind(got, "error") if got is not None else None
    error_rows = (
        errors.select(["track_id", "uri", "stage", "error_type", "message"]).to_pylist()
        if errors is not None
        else []
    )
    failed = {e["track_id"] for e in error_rows}
    if rows is not None:
        lost = [r for r in rows if r["chunk"] == ch.ix and r["track_id"] not in ch.done]
        error_rows += [{"track_id": r["track_id"], "uri": redact(r["uri"]), "stage": "pipeline",
                        "error_type": "Incomplete", "message": "not every window of the track came out of "
                        "the pipeline; not stored (a rerun retries it)"} for r in lost]  # fmt: skip
        failed |= {r["track_id"] for r in lost}
    windows = only_kind(got, "window") if got is not None else None
    if windows is None:
        tracks = track_rows(pa.table({}), info, meta_cols, run_id, embedded_at)
        return ChunkOutput(
            ch.ix, ch.fragments, tracks, pa.table({c: [] for c in TIME_COLUMNS}), error_rows, failed
        )
    if failed:
        windows = windows.filter(
            pa.compute.invert(pa.compute.is_in(windows["track_id"], pa.array(sorted(failed), pa.string())))
        )
    tracks = track_rows(windows, info, meta_cols, run_id, embedded_at)
    check_finite_table(tracks, "tracks")  # the last check before the driver commits them
    ok = windows.filter(pa.compute.is_in(windows["track_id"], tracks["track_id"]))
    return ChunkOutput(ch.ix, ch.fragments, tracks, ok.select(TIME_COLUMNS), error_rows, failed)


def chunk_writer_args(
    store: Store,
    run_id: str,
    layers: Sequence[int],
    dim: int,
    frames_hz: float | None,
    settings_id: str,
) -> dict[str, Any]:
    """The constructor arguments of the :class:`pipeline.flow.stages.ChunkWriter` actors of a run
    writing to ``store`` (frames only when ``frames_hz`` is set)."""
    return dict(
        windows_uri=store.uri("windows"),
        frames_uri=store.uri("frames") if frames_hz else None,
        layers=layers,
        dim=dim,
        frames_hz=frames_hz,
        settings_id=settings_id,
        run_id=run_id,
        storage_options=store.lance_options,
    )


def write_parts(ds: Dataset, writer_args: dict[str, Any], max_writers: int) -> Dataset:
    """The embedded rows of ``ds`` written by a pool of up to ``max_writers``
    :class:`pipeline.flow.stages.ChunkWriter` actors (``writer_args``): a lazy dataset of the
    parts written (their files, not yet committed)."""
    import ray

    from pipeline.flow.stages import ChunkWriter

    # Writer actors (a retried batch rewrites its files; only the driver commits). They reserve no
    # CPU, so the stream can never stall behind actors holding every CPU of a small node, and a
    # pool of them growing with the work keeps up with the decoders (writing is a fraction of
    # decoding's cost). Actors, not tasks: a task-based writer started a fresh worker process
    # (~1.5 CPU s of imports) for most blocks, because the idle workers of a node with more
    # workers than CPUs are stopped after a second.
    return ds.map_batches(
        ChunkWriter,
        fn_constructor_kwargs=writer_args,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_writers),
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )


def _add_pass_seconds(stage_s: dict[str, float], t0: float, cpu0: float | None) -> None:
    """Add the wall seconds since ``t0`` (``perf_counter``) to ``stage_s["decode+model"]`` and, when
    ``cpu0`` was measured, the CPU seconds of this machine's run processes since then."""
    stage_s["decode+model"] = stage_s.get("decode+model", 0.0) + time.perf_counter() - t0
    cpu1 = None if cpu0 is None else process_tree_cpu_s()
    if cpu0 is not None and cpu1 is not None:  # CPU s of this machine's run processes meanwhile
        stage_s["decode+model_cpu"] = stage_s.get("decode+model_cpu", 0.0) + cpu1 - cpu0


def stream_chunks(
    rows: Sequence[Mapping[str, Any]] | TodoRows,
    job: FlowJob,
    info: ModelInfo,
    store: Store,
    run_id: str,
    meta_cols: Sequence[str],
    chunk_size: int,
    on_chunk: Callable[[ChunkOutput], None],
    stage_s: dict[str, float],
    embedded_at: dt.datetime | None = None,
    model_stage: type | None = None,
) -> StreamResult:
    """Embed ``rows`` (catalog rows, or :class:`TodoRows` already cut into chunks) in one
    streaming pass; call ``on_chunk`` for each chunk of ``chunk_size`` tracks as soon as all of
    it has come out of the stream. The driver holds only the chunks in flight. Returns the actor
    restarts and the per-window timings of the pass (their decode and model seconds are also
    added to ``stage_s``). ``model_stage`` replaces ``EmbedStage`` (benchmarks)."""
    from pipeline.flow.stages import ChunkWriter

    source: list[dict[str, Any]] | Dataset
    if isinstance(rows, TodoRows):
        n, source, rows_of_chunk = rows.count, rows.ds, rows.rows_of_chunk
    else:
        cut = chunk_of(np.arange(len(rows)), chunk_size).tolist()
        source = [{**r, "chunk": c} for r, c in zip(rows, cut, strict=True)]
        n = len(source)

        def rows_of_chunk(ix: int) -> list[dict[str, Any]]:
            return source[ix * chunk_size : (ix + 1) * chunk_size]

    n_chunks = -(-n // chunk_size)
    chunks: dict[int, Chunk] = {}  # chunks in flight (created when their first part arrives)
    finished: set[int] = set()

    def chunk(ix: int) -> Chunk:
        if ix not in chunks:
            chunks[ix] = Chunk(ix, chunk_len(ix, n, chunk_size))
        return chunks[ix]

    model_actors, decode_actors, pools = size_pools(job, info, n)
    s = info.settings
    writer_args = chunk_writer_args(store, run_id, s.layers, info.dim, s.frames_hz, info.settings_id)
    ChunkWriter(**writer_args)  # checks the arguments here, before anything starts
    t0 = time.perf_counter()
    # busy cores: CPU s of this process's tree, which holds the workers only when the cluster is
    # the local one this process started (not under RAY_ADDRESS, e.g. ``ray job submit``)
    cpu0 = None if os.environ.get("RAY_ADDRESS") else process_tree_cpu_s()
    stream = embed_stream(
        source, job, info, decode_actors, model_actors, model_stage=model_stage, pools=pools
    )
    parts = write_parts(stream.ds, writer_args, max_writers=max(1, decode_actors[1] // 2))
    times: list[pa.Table] = []

    def done(out: ChunkOutput) -> None:
        if out.times.num_rows:
            times.append(out.times)
        on_chunk(out)

    batches = iter(parts.iter_batches(batch_size=None, batch_format="pyarrow"))
    failed = True
    try:
        for batch in batches:
            for part in batch.to_pylist():
                ch = chunk(part["chunk"])
                ch.add(*ChunkWriter.read_part(part))
                if ch.complete:
                    finished.add(ch.ix)
                    done(
                        finish_chunk(
                            chunks.pop(ch.ix), info, meta_cols, run_id, embedded_at or schemas.utc_now()
                        )
                    )
        for ix in range(n_chunks):  # tracks that never came out of the stream (not expected)
            if ix not in finished:
                lost = chunks.pop(ix, None) or Chunk(ix, chunk_len(ix, n, chunk_size))
                done(finish_chunk(lost, info, meta_cols, run_id, embedded_at or schemas.utc_now(),
                                  rows=rows_of_chunk(ix)))  # fmt: skip
        failed = False
    finally:
        # leaving early (a failed commit, an injected failure, Ctrl-C) must stop the pass now: its
        # actors hold the GPUs and CPUs the next run needs
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        restarts = stream.finish(failed)
        _add_pass_seconds(stage_s, t0, cpu0)
    all_times = pa.concat_tables(times) if times else None
    add_worker_seconds(stage_s, all_times)
    return StreamResult(restarts, all_times, stream.actors)


def table_schema(info: ModelInfo, name: str) -> pa.Schema:
    """Schema of the ``windows`` or ``frames`` table for these settings."""
    if name == "windows":
        return schemas.windows_schema(info.settings.layers, info.dim)
    return schemas.frames_schema(info.settings.layers, info.dim)
