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

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACTOR_MAX_RESTARTS",
    "ACTOR_MAX_TASK_RETRIES",
    "DECODE_MAX_CRASHES",
    "TASK_MAX_RETRIES",
    "CpuModelPlan",
    "actor_ids",
    "actor_restarts",
    "actors_started",
    "cluster_gpus",
    "configure_data_context",
    "cpu_model_plan",
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
        ray.init(address="local", include_dashboard=False, **kwargs)


def _stage_actors(before: set[str] | None) -> list[tuple[str, dict[str, Any]]] | None:
    """(kind, GCS row) of the decode / model actors created after ``before`` (actor ids; ``None``:
    all of them), or ``None`` when the actor table cannot be read."""
    try:
        import ray._private.state  # the public state API needs the dashboard

        table = ray._private.state.actors()
    except Exception:
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


def actor_ids() -> set[str]:
    """Ids of every actor in the cluster's GCS table (empty when it cannot be read)."""
    try:
        import ray._private.state

        return set(ray._private.state.actors())
    except Exception:
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


def default_cpu_model_actors() -> int:
    """Model actors when ``--gpu-actors`` is not given on a cluster without GPUs: one per core of
    the largest node, at most :data:`CPU_MODEL_ACTORS_MAX`, each with its share of the cores as
    torch threads (:func:`cpu_model_plan`). Several single-threaded model processes beat one
    process with as many torch threads: a small model's operators are too short to keep two
    threads busy (the second one spins at each barrier), and while a decoder holds a core a
    multi-threaded call waits for its preempted thread; independent processes just take turns."""
    return max(1, min(largest_node_cpus(), CPU_MODEL_ACTORS_MAX))


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
#: exits (a few hundred MB for a model actor, which holds it anyway at the next batch).
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
