"""What the driver learns about the model before a run: one CPU load for its id, sizes and the
settings fingerprint (:class:`ModelInfo`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import one_line
from pipeline.flow.inference import EmbedSettings, load_model, resolve_precision
from pipeline.flow.runtime import ensure_ray
from pipeline.runs.settings import EmbedJob


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learns about the model before the run (from one CPU load)."""

    model_id: str
    dim: int
    depth: int
    settings: EmbedSettings
    settings_id: str
    gpus: int
    config: Any = field(default=None, compare=False)  # musicfm.MusicFMConfig: sizes the pools


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
        config=probe.config,
    )


def model_info_for_plan(job: EmbedJob) -> ModelInfo:
    """Model id and settings fingerprint for the plan; starts/joins Ray only when the precision
    depends on the cluster's GPUs (``auto``/``fp16``)."""
    if job.precision in ("auto", "fp16"):
        import ray

        ensure_ray()
        return probe_model(job, int(ray.cluster_resources().get("GPU", 0)))
    return probe_model(job, 0)
