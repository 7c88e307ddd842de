"""Ray runtime: connecting to / starting a cluster, the Ray Data context of a run, actor pool
sizing on clusters without GPUs, and the only uses of Ray internals in the package.

Ray internals used here, each with the public alternative and why it is not used:

* ``ray._private.state.actors()`` (the GCS actor table: restart counts, alive actors of this
  job). Public alternative: ``ray.util.state.list_actors`` — it needs the dashboard, which
  local clusters of this project run without.
* ``core_worker.kill_actor`` on Ray Data's ``MapWorker`` actors of an abandoned stream.
  Public alternative: ``ray.kill(handle)`` — Ray Data does not hand out the handles of its
  pool actors, and has no public "stop this stream's pools" call.
* ``ray._private.state.jobs()`` (the GCS job table) and the node's ``session_name``: whether
  the holder of a store lease, a driver of this cluster, has ended. Public alternative:
  ``ray.job_submission.JobSubmissionClient.list_jobs`` — it needs the dashboard's HTTP address
  and only knows jobs submitted through it, not plain drivers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline import signals
from pipeline.engine.device import CPU_DEFAULT_BATCH

log = logging.getLogger(__name__)

__all__ = [
    "ACTOR_MAX_RESTARTS",
    "ACTOR_MAX_TASK_RETRIES",
    "DECODE_MAX_CRASHES",
    "TASK_MAX_RETRIES",
    "CpuModelPlan",
    "ModelCost",
    "PoolPlan",
    "actor_ids",
    "actor_restarts",
    "actors_started",
    "cluster_gpus",
    "configure_data_context",
    "cpu_model_plan",
    "decode_actor_bytes",
    "model_cost",
    "plan_pools",
    "process_tree_cpu_s",
    "default_cpu_model_actors",
    "ensure_ray",
    "stop_stage_actors",
    "worker_runtime_env",
]

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
    # groupbys (the Ray planner's partitions; measured when the embed job grouped its tracks):
    # Ray 2.60's default hash shuffle starts a pool of aggregator actors
    # (seconds per run, and CPUs reserved beside the decode pool); the sort-based shuffle runs as
    # plain tasks. Measured on the 200-track refresh benchmark: write stage 10.8 s -> 2.6 s.
    from ray.data.context import ShuffleStrategy

    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ctx


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
        from pipeline.flow.health import NODE_HEALTH_CHECKS  # node loss as on infra/'s heads

        ray.init(address="local", include_dashboard=False, _system_config=dict(NODE_HEALTH_CHECKS), **kwargs)
    signals.reassert()  # ray.init replaced a graceful stop's SIGTERM handler


def _stage_actors(before: set[str] | None) -> list[tuple[str, dict[str, Any]]] | None:
    """(kind, GCS row) of the decode / model actors created after ``before`` (actor ids; ``None``:
    all of them), or ``None`` when the actor table cannot be read."""
    try:
        import ray._private.state  # the public state API needs the dashboard

        table = ray._private.state.actors()
    except Exception as e:  # an internal API: the caller says what is then unknown
        log.warning("cannot read Ray's actor table (%s: %s)", type(e).__name__, e)
        return None
    out = []
    for aid, a in table.items():
        name = str(a.get("ActorClassName") or "")
        kind = "decode" if "DecodeStage" in name else "model" if "EmbedStage" in name else None
        if kind and (before is None or aid not in before):
            out.append((kind, a))
    return out


def actor_restarts(before: set[str] | None = None) -> dict[str, int]:
    """Restarts of this cluster's decode / model actors created after ``before`` (actor ids), from
    the GCS actor table; ``{}`` when it cannot be read. ``before=None``: all of them."""
    actors = _stage_actors(before)
    if actors is None:
        log.warning("actor restarts of this run are unknown: the report shows none")
        return {}
    out = {"decode": 0, "model": 0}
    for kind, a in actors:
        out[kind] += int(a.get("NumRestarts") or 0)
    return out


def actors_started(before: set[str]) -> dict[str, int]:
    """Decode / model actors created after ``before`` (actor ids): how large the (autoscaling)
    pools grew during a run; ``{}`` when the actor table cannot be read."""
    actors = _stage_actors(before)
    if actors is None:
        log.warning("the actors this run started are unknown: the report shows none")
        return {}
    out = {"decode": 0, "model": 0}
    for kind, _ in actors:
        out[kind] += 1
    return out


def stop_stage_actors(before: set[str]) -> int:
    """Kill this driver's Ray Data stage actors (``MapWorker``) created after ``before`` that are
    still alive; returns how many. Other jobs' actors on a shared cluster are never touched."""
    try:
        import ray
        import ray._private.state

        table = ray._private.state.actors()
        me = ray.get_runtime_context().get_job_id()
        core = ray._private.worker.global_worker.core_worker
    except Exception as e:  # internal APIs: say that the actors may live on
        log.warning(
            "cannot stop this run's stage actors (%s: %s); they end with the driver", type(e).__name__, e
        )
        return 0
    n = 0
    for aid, a in table.items():
        alive = a.get("State") != "DEAD" and aid not in before
        if alive and a.get("JobID") == me and str(a.get("ActorClassName") or "").startswith("MapWorker("):
            try:
                core.kill_actor(ray.ActorID.from_hex(aid), True)
                n += 1
            except Exception as e:  # most often: it ended between the table read and the kill
                log.warning("could not stop actor %s (%s: %s)", aid, type(e).__name__, e)
    return n


def actor_ids() -> set[str]:
    """Ids of every actor in the cluster's GCS table (empty when it cannot be read)."""
    try:
        import ray._private.state

        return set(ray._private.state.actors())
    except Exception as e:  # then every actor counts as this run's: the caller's counts say so
        log.warning(
            "cannot read Ray's actor table (%s: %s): actors of other runs may be counted as this run's",
            type(e).__name__,
            e,
        )
        return set()


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


#: Most model actors :func:`default_cpu_model_actors` gives a node without GPUs (each holds a copy
#: of the model: 1.3 GB for the full-size one in fp32).
CPU_MODEL_ACTORS_MAX = 4


def largest_node_cpus() -> int:
    """CPUs of the cluster's largest alive node (1 when unknown)."""
    import ray

    return int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)) or 1


def default_cpu_model_actors(cost: ModelCost | None = None) -> int:
    """Model actors when ``--gpu-actors`` is not given on a cluster without GPUs, at most
    :data:`CPU_MODEL_ACTORS_MAX`, each with its share of the cores as torch threads
    (:func:`cpu_model_plan`): one per :func:`threads_per_model_actor` cores of the largest node
    (``cost`` None: one per core). A small model's operators are too short to keep two threads
    busy (the second one spins at each barrier), so several single-threaded processes that take
    turns beat one multi-threaded one; the full-size model's are long enough, and there one actor
    with both threads of a 2-core node beat two single-threaded ones (job ÷ model-only 0.84
    against 0.49, issue 25), with half the memory."""
    per = 1 if cost is None else threads_per_model_actor(cost)
    return max(1, min(largest_node_cpus() // per, CPU_MODEL_ACTORS_MAX))


#: GFLOP per audio second that keeps one more torch thread busy (the rule of
#: :func:`threads_per_model_actor`): the golden model (0.05) gets 1 thread per actor, the
#: full-size one (41.8) 5, a 4 x 512 model with 128 conv channels (3.1) 1.
GFLOP_PER_THREAD = 8.0


def threads_per_model_actor(cost: ModelCost) -> int:
    """Torch threads one CPU model actor keeps busy: one per :data:`GFLOP_PER_THREAD` of the
    model's work per audio second, 1 to 8."""
    return max(1, min(8, int(cost.gflop_per_audio_s // GFLOP_PER_THREAD)))


def cpu_model_plan(decode_cpus: int, model_actors: int) -> CpuModelPlan:
    """Model actors on a cluster without GPUs: each reserves what the largest node has left beside
    the decode actors (the writer tasks reserve none), and runs torch on its share of all the
    node's cores, with the decoders niced below it. Without
    this a model actor's torch threads and the decoders fight for the same cores."""
    node = largest_node_cpus()
    actors = max(1, model_actors)
    threads = max(1, node // actors)
    return CpuModelPlan(
        reserve=max(0, (node - decode_cpus) // actors),  # 0: it can always be scheduled
        threads=threads,
        # niced decoders protect a multi-threaded model call (one preempted thread stalls the
        # others at the next barrier); single-threaded model actors just share the cores fairly
        # with them, which lets the decoders run ahead instead of starving the models later
        decode_niceness=CPU_DECODE_NICENESS if threads > 1 else 0,
    )


#: glibc malloc settings for the decode and model workers (``GLIBC_TUNABLES``, read when a process
#: starts). By default every block above 32 MB (a batch of 30 s windows in float64, the conv
#: front end's activations, a decoded track) is a fresh ``mmap`` that the kernel zeroes page by
#: page and takes back at ``free``: 2.3M page faults and ~5 CPU s of kernel time per 1.3 h of audio
#: with the golden model. Keeping freed memory in the heap (no mmap, no trim) and backing it with
#: transparent huge pages cuts the faults 100x; measured in-process (golden model, 28 real
#: tracks, 1 thread): model 19.5 -> 14.0 CPU s. The price: a worker keeps its peak heap until it
#: exits (a few hundred MB for a model actor, which holds it anyway at the next batch). A decode
#: actor's peak is a long track, not a steady batch: it hands its heap back (``malloc_trim``) after
#: a streamed track or one over 64 MB decoded (``pipeline.flow.decode.DecodeStage``), and streams
#: tracks over 20 minutes, so its peak is bounded by the window, not the file.
WORKER_MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.mmap_threshold=4294967296",
    "glibc.malloc.trim_threshold=4294967296",
)


def worker_runtime_env() -> dict[str, Any]:
    """``runtime_env`` of the decode and model actors: :data:`WORKER_MALLOC_TUNABLES` added to the
    ``GLIBC_TUNABLES`` of this process's environment (ignored off glibc). Ray merges these
    ``env_vars`` with the job's own runtime environment. ``MUSICFM_WORKER_MALLOC=default`` in the
    driver's environment leaves the workers' allocator as it is."""
    if os.environ.get("MUSICFM_WORKER_MALLOC") == "default":
        return {}
    own = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in own}
    tunables = own + [t for t in WORKER_MALLOC_TUNABLES if t.split("=", 1)[0] not in names]
    return {"env_vars": {"GLIBC_TUNABLES": ":".join(tunables)}}


def cluster_gpus(stage_s: dict[str, float]) -> int:
    """GPUs of the cluster (connecting first; the time is added to ``stage_s["ray_init"]``)."""
    import ray

    t0 = time.perf_counter()
    ensure_ray()
    stage_s["ray_init"] = stage_s.get("ray_init", 0.0) + time.perf_counter() - t0
    return int(ray.cluster_resources().get("GPU", 0))


def driver_identity() -> dict[str, str]:
    """This driver's Ray session and job id (recorded in the store lease), ``{}`` without Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return {}
        import ray._private.worker

        session = ray._private.worker.global_worker.node.session_name
        return {"ray_session": str(session), "ray_job": ray.get_runtime_context().get_job_id()}
    except Exception:  # an identity is a bonus: the lease works without it
        return {}


def ray_job_ended(row: Any) -> bool:
    """Whether the lease holder ``row`` was a driver of *this* Ray cluster (same session) whose
    job has ended. ``False`` when that cannot be proven (other cluster, no Ray, no job table)."""
    mine = driver_identity()
    if not mine or not row.get("ray_job") or row.get("ray_session") != mine.get("ray_session"):
        return False
    try:
        import ray._private.state

        for job in ray._private.state.jobs():
            if job.get("JobID") == row["ray_job"]:
                return bool(job.get("IsDead"))
    except Exception:  # no job table: not proven
        return False
    return False


def pool_bounds(lo: int | None, hi: int, work: int) -> tuple[int, int]:
    """(min, max) actors of a pool of at most ``hi`` (``lo`` None: fixed size), never more than
    ``work`` items need: a quiet night's run does not start every actor the cluster could hold."""
    hi = max(1, min(int(hi), max(1, work)))
    lo = hi if lo is None else max(1, min(int(lo), hi))
    return lo, hi


def default_decode_cpus(gpus: int, model_actors: int) -> int:
    """Most decode actors when ``--decode-cpus`` is not given: with GPUs, every CPU of the
    cluster but one per model actor (the pool starts at 1 and grows with the work). Without GPUs
    the model actors want the cores: one decoder per 4 CPUs of the largest node, at least 1.
    Decoding costs ~1 % of the full-size model's CPU; even beside the tiny golden model (where
    it is 30 %) one decoder on a 2-core node beat two (job over 4 h of real tracks: 59.3 s
    against 66.2 s), as the second one only adds a process start and contention."""
    if gpus <= 0:
        return max(1, largest_node_cpus() // 4)
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus - model_actors)


# --------------------------------------------------------------------------- memory and pool shape


@dataclass(frozen=True)
class ModelCost:
    """What one model actor costs, computed from the model's sizes (no forward pass needed).

    Attributes:
        gflop_per_audio_s: model FLOPs per audio second (2 per multiply-add; mel filterbank, conv
            front end and Conformer, as ``bench/flops.py`` counts them: 41.8 at full size).
        weight_bytes: parameters in memory (fp32; bf16/fp16 keep a cast copy beside them).
        window_bytes: activations of one more window in a batch at the precision (CPU, peak).
        process_bytes: the worker process itself (Python, torch, Ray) and the model's fixed part.
    """

    gflop_per_audio_s: float
    weight_bytes: int
    window_bytes: int
    process_bytes: int

    def actor_bytes(self, batch: int) -> int:
        """Memory of one model actor running ``batch`` windows per call."""
        return self.process_bytes + self.weight_bytes + max(1, batch) * self.window_bytes


#: A model worker's own memory beside the model (Python, torch, Ray, pyarrow), measured USS ~0.4 GB.
MODEL_PROCESS_BYTES = 600 * 1024**2
#: Host memory of a GPU model actor beside its process and weights: the CUDA context and the pinned
#: staging buffers of its input batches (not measured here: no GPU was lent; Ray's high-memory check
#: on a GPU run says if it is short).
GPU_HOST_BYTES = 1024**3
#: A decode worker's own memory (Python, pyarrow, soundfile, Ray).
DECODE_PROCESS_BYTES = 400 * 1024**2
#: Live front-end activation maps per window at the peak: 3 in the graph (conv1, conv2 and the
#: shortcut of the first block), and 3.0 measured beside the STFT's own buffers (peak RSS of a
#: forward at batch 1 and 2: 4 x 512 with 128 conv channels at 10 s, 78.5 MB per window; full size
#: at 5 s, 114 MB per window).
ACTIVATION_MAPS = 3.0
#: Margin on the activation estimate: Ray's high-memory check wants a request >= 1.25 x the peak it
#: saw, and one more window of a 4 x 512 model's forward was measured at 1.30 x the bare estimate
#: (58.7 MB vs 45.0 MB, in a full test run: the allocator's variance), so 1.5.
RAY_HEADROOM = 1.5


def model_cost(config: Any, window_s: float, precision: str = "fp32") -> ModelCost:
    """:class:`ModelCost` of a ``musicfm.MusicFMConfig`` (or anything with its size fields) for
    windows of ``window_s`` seconds at ``precision``."""
    d, depth, c, f = config.encoder_dim, config.encoder_depth, config.conv_dim, config.ffn_dim
    m = config.n_mels
    fps = config.sample_rate / config.hop_length  # mel frames per second
    tok = fps / 4  # tokens per second after the two stride-2 blocks
    t = tok * window_s  # tokens per window (attention is quadratic in it)
    # multiply-adds per audio second
    b0 = (m / 2) * (fps / 2) * 9 * (2 * c + c * c)  # conv1 + conv3 (1 -> C), conv2 (C -> C)
    b1 = (m / 4) * (fps / 4) * 9 * 3 * c * c
    proj = tok * c * (m / 4) * d
    layer = 2 * 2 * d * f + 4 * d * d + 2 * t * d + 3 * d * d + config.conv_kernel * d
    mel = fps * m * (config.n_fft // 2 + 1)  # the mel filterbank's matmul (the FFT is not counted)
    macs = mel + b0 + b1 + proj + tok * depth * layer
    params = 9 * (2 * c + c * c + 3 * c * c) + c * (m / 4) * d + depth * (2 * 2 * d * f + 7 * d * d)
    half = precision in ("bf16", "fp16")
    elem = 2 if half else 4
    frames = fps * window_s
    maps = ACTIVATION_MAPS * c * (m / 2) * (frames / 2) * elem
    # the STFT in fp32 whatever the precision: framed input (twice: windowed), complex bins, power
    stft = frames * (2 * config.n_fft * 4 + (config.n_fft // 2 + 1) * 12)
    conformer = 4 * t * max(f, 2 * d) * elem + 2 * t * t * config.num_heads * elem
    window = maps + stft + conformer + 8 * config.sample_rate * window_s  # + the input, in float64
    return ModelCost(
        gflop_per_audio_s=2 * macs / 1e9,
        weight_bytes=int(params * 4 * (1.5 if half else 1.0)),
        window_bytes=int(RAY_HEADROOM * window),
        process_bytes=MODEL_PROCESS_BYTES,
    )


def decode_actor_bytes(window_s: float, windows_per_block: int, whole_up_to_s: float) -> int:
    """Memory of one decode actor: its process, one block of windows on the way out, and the
    largest track it decodes whole (samples + their window copy, at 24 kHz float32); longer ones
    are streamed (``pipeline.flow.decode.DecodeStage``)."""
    block = windows_per_block * window_s * 24000 * 4
    return int(DECODE_PROCESS_BYTES + 2 * block + 2 * whole_up_to_s * 24000 * 4)


@dataclass(frozen=True)
class PoolPlan:
    """The shape of a run's pools on the cluster it has, and the memory each actor declares."""

    model_actors: int
    batch_size: int | None  # windows per model call (None: the GPU actor sizes it from its memory)
    model_memory: int  # bytes each model actor requests from Ray
    decode_memory: int  # bytes each decode actor requests from Ray


def largest_node_memory() -> int:
    """Ray's ``memory`` resource of the cluster's largest alive node (bytes, 0 when unknown)."""
    import ray

    return int(max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0))


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def plan_pools(
    cost: ModelCost,
    model_actors: int,
    decoders_per_node: int,
    decode_memory: int,
    batch_size: int | None,
    gpus: int,
    node_memory: int,
    cpu_batch: int = CPU_DEFAULT_BATCH,
) -> PoolPlan:
    """Fit the model actors into the largest node's memory beside its decoders. On CPU: fewer
    actors, then smaller batches (from ``cpu_batch`` down to one window); a GPU actor's host
    memory is its process and weights (its batch is sized from GPU memory in the actor).
    ``model_actors`` is what the CPU / ``--gpu-actors`` rule gives, ``batch_size`` ``--batch-size``.

    Raises:
        ValueError: (one line) the node cannot hold one model actor beside one decoder.
    """
    if node_memory <= 0:  # no memory figure (an odd cluster): declare, never refuse
        node_memory = 1 << 62
    alone = node_memory - decode_memory  # one decoder and one model actor: the least a run needs
    if gpus > 0:
        need = cost.process_bytes + cost.weight_bytes + GPU_HOST_BYTES
        if alone < need:
            raise ValueError(_too_small(need, node_memory, decode_memory))
        return PoolPlan(model_actors, batch_size, need, decode_memory)
    need1 = cost.actor_bytes(batch_size or 1)
    if alone < need1:
        raise ValueError(_too_small(need1, node_memory, decode_memory))
    room = node_memory - max(1, decoders_per_node) * decode_memory
    if room < need1:  # the decoders beyond the first wait for memory (the decode pool starts at 1)
        room = alone
    actors = max(1, min(model_actors, room // need1))
    batch = batch_size
    if batch is None:
        per = room // actors - cost.process_bytes - cost.weight_bytes
        batch = max(1, min(cpu_batch, per // cost.window_bytes))
    return PoolPlan(actors, batch, cost.actor_bytes(batch), decode_memory)


def _too_small(need: int, node_memory: int, decode_memory: int) -> str:
    return (
        f"the largest node has {_gib(node_memory)} of memory for Ray; one model actor needs {_gib(need)} "
        f"beside one decoder ({_gib(decode_memory)}): use a node with at least "
        f"{_gib(need + decode_memory)}, a smaller --batch-size or shorter --window-s"
    )


def process_tree_cpu_s(root: int | None = None) -> float | None:
    """CPU seconds (user + system) used so far by process ``root`` (default: this one) and all its
    descendants, the ended ones included (their time is in their parent's ``cutime``/``cstime``
    once reaped), from ``/proc``; None off Linux. On a local cluster the driver's tree holds the
    Ray processes and every worker; on a remote cluster only the driver."""
    root = os.getpid() if root is None else root
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        entries = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError as e:
        log.warning("no CPU accounting (%s): busy cores are not reported", e)
        return None
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in entries:
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read().decode("latin-1")
        except OSError:  # the process ended between the listing and the read: its parent has it
            continue
        fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += children.get(pid, [])
    return total
