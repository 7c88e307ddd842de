"""What the driver learns about the model before a run: one CPU load for its id, sizes and the
settings fingerprint (:class:`pipeline.engine.model_info.ModelInfo`) from a run's :class:`EmbedJob`."""

from __future__ import annotations

import time

from pipeline.engine.inference import EmbedSettings, load_model, resolve_precision
from pipeline.engine.model_info import ModelInfo, describe_model
from pipeline.errors import one_line
from pipeline.flow.runtime import ensure_ray
from pipeline.runs.settings import EmbedJob


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
        raise type(e)(one_line(str(e))) from None
    # "auto" precision follows the cluster: bf16 when it has GPUs, fp32 otherwise.
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
    return describe_model(probe, settings, gpus)


def model_info_for_plan(job: EmbedJob) -> ModelInfo:
    """Model id and settings fingerprint for the plan; starts/joins Ray only when the precision
    depends on the cluster's GPUs (``auto``/``fp16``)."""
    if job.precision in ("auto", "fp16"):
        import ray

        ensure_ray()
        return probe_model(job, int(ray.cluster_resources().get("GPU", 0)))
    return probe_model(job, 0)
