"""Training examples for fine-tuning, from the embed job's own Ray Data decode stage.

    labelled tracks ──DecodeStage (CPU actors, as in the embed job)──▶ window rows (audio) | error rows
                    ──to_examples (CPU tasks)──▶ {"audio": (n, N) float32, "label": (n,) int64}

One example per ``window_s`` window of a track (windows laid as the embed job lays them: the tail
window aligned to the track end); a track shorter than one window is repeated to the window length.
A track that cannot be fetched or decoded is left out with a warning naming it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import uuid
import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.evaluate.finetune_spec import FinetuneSpec

log = logging.getLogger(__name__)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` (L,) cut or repeated to exactly ``n`` samples."""
    if x.shape[0] >= n:
        return x[:n]
    reps = -(-n // max(1, x.shape[0]))
    return np.tile(x, reps)[:n]


def to_examples(batch: pa.Table, n_samples: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: decoded window rows -> fixed-length examples
    (``audio`` (n, n_samples) float32, ``label`` (n,) int64); error rows are logged and dropped."""
    from pipeline.flow.stages import audio_views

    kinds = batch["kind"].to_pylist()
    for i in (i for i, k in enumerate(kinds) if k == "error"):
        row = {c: batch[c][i].as_py() for c in ("uri", "stage", "error_type", "message")}
        log.warning("fine-tuning: %(uri)s left out: %(stage)s %(error_type)s: %(message)s", row)
    keep = [i for i, k in enumerate(kinds) if k == "window"]
    views = audio_views(batch["audio"].take(keep)) if keep else []
    metas = batch["metadata_json"].take(keep).to_pylist() if keep else []
    audio = np.zeros((len(keep), n_samples), np.float32)
    for j, v in enumerate(views):
        audio[j] = fit_length(np.asarray(v, np.float32), n_samples)
    labels = np.array([int(json.loads(m)["label"]) for m in metas], np.int64)
    return {"audio": audio, "label": labels}


def training_rows(spec: FinetuneSpec) -> list[dict[str, Any]]:
    """The catalog rows of the training tracks, in a seeded random order (windows of one track
    follow each other out of the decode stage: shuffling tracks spreads the labels)."""
    rows = [
        {"track_id": f"ft-{i:07d}", "uri": t.uri, "metadata_json": json.dumps({"label": t.label})}
        for i, t in enumerate(spec.train)
    ]
    random.Random(spec.seed).shuffle(rows)
    return rows


def training_dataset(spec: FinetuneSpec, decode_actors: int | None = None) -> tuple[Any, str]:
    """The lazy Ray dataset of training examples and the decode stage's crash-marker folder
    (remove it after the run)."""
    import ray

    from musicfm import MusicFMConfig
    from pipeline.engine.inference import EmbedSettings
    from pipeline.flow.runtime import ACTOR_MAX_RESTARTS, ACTOR_MAX_TASK_RETRIES, DECODE_MAX_CRASHES
    from pipeline.flow.stages import DecodeStage
    from pipeline.io.audio import AudioLimits

    settings = EmbedSettings(layers=(spec.layer,), window_s=spec.window_s, hop_s=spec.window_s)
    n_samples = settings.window_spec().window_samples
    if n_samples < MusicFMConfig().min_samples:
        raise ValueError(f"window_s={spec.window_s} is shorter than the model's shortest input")
    attempts_dir = os.path.join(tempfile.gettempdir(), "musicfm-decode-attempts", uuid.uuid4().hex)
    rows = training_rows(spec)
    n_actors = decode_actors or max(1, min(spec.num_workers, len(rows)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * n_actors)))
    # as in pipeline.flow.streaming: max_restarts / max_task_retries go through ray_remote_args on purpose
    warnings.filterwarnings(
        "ignore", message=".*ray_remote_args.* is deprecated", module=r"pipeline\.evaluate\.finetune_data"
    )
    decoded = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs=dict(
            settings=settings,
            limits=AudioLimits(),
            storage_options=spec.storage_options or None,
            attempts_dir=attempts_dir,
            max_crashes=DECODE_MAX_CRASHES,
        ),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors),
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )
    examples = decoded.map_batches(
        to_examples, fn_kwargs={"n_samples": n_samples}, batch_size=None, batch_format="pyarrow"
    )
    return examples, attempts_dir
