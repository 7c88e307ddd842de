"""What the driver learns about the model before a run: one CPU load for its id, sizes and the
settings fingerprint (:class:`pipeline.engine.model_info.ModelInfo`) from a run's :class:`EmbedJob`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.engine.inference import EmbedSettings, load_model, resolve_precision
from pipeline.engine.model_info import ModelInfo, describe_model
from pipeline.errors import one_line
from pipeline.flow.runtime import ensure_ray
from pipeline.runs.settings import EmbedJob

if TYPE_CHECKING:
    from musicfm import MusicFM25Hz


def probe_model(job: EmbedJob, gpus: int) -> ModelInfo:
    """Load the model once in this process (CPU) for its id, sizes and settings fingerprint.

    ``gpus`` is the cluster's GPU count (it resolves ``--precision auto``); needs no Ray.
    """
    return describe_job_model(job, load_probe(job), gpus)


def load_probe(job: EmbedJob) -> MusicFM25Hz:
    """The job's model loaded once in this process on CPU (for its id and sizes; needs no Ray,
    so it can run while the cluster starts). A checkpoint's problems come as one line."""
    try:
        return load_model(
            job.checkpoint,
            job.stats,
            job.model_config,
            device="cpu",
            storage_options=job.storage_options or None,
        )
    except ValueError as e:  # CheckpointError lists one problem per line; the CLI prints one line
        if "\n" not in str(e):
            raise
        raise type(e)(one_line(str(e))) from None


def describe_job_model(job: EmbedJob, model: MusicFM25Hz, gpus: int) -> ModelInfo:
    """:class:`ModelInfo` of ``model`` run with the job's settings on a cluster with ``gpus`` GPUs:
    ``--precision auto`` follows the cluster (bf16 when it has GPUs, fp32 otherwise)."""
    precision = resolve_precision(job.precision, "cuda" if gpus > 0 else "cpu")
    settings = EmbedSettings(
        layers=job.layers,
        window_s=job.window_s,
        hop_s=job.hop_s,
        frames_hz=job.frames_hz,
        precision=precision,
        compile=job.compile,
        loudness_target_db=job.loudness_target_db,
    )
    return describe_model(model, settings, gpus)


def precision_gpus(job: EmbedJob) -> int:
    """The cluster's GPU count where the job's precision depends on it (``auto``/``fp16``: starts
    or joins Ray), else 0 (no Ray needed)."""
    if job.precision not in ("auto", "fp16"):
        return 0
    import ray

    ensure_ray()
    return int(ray.cluster_resources().get("GPU", 0))


def model_info_for_plan(job: EmbedJob) -> ModelInfo:
    """Model id and settings fingerprint for the plan; starts/joins Ray only when the precision
    depends on the cluster's GPUs (``auto``/``fp16``)."""
    model = load_probe(job)
    return describe_job_model(job, model, precision_gpus(job))
