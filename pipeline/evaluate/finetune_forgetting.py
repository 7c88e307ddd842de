"""Forgetting after fine-tuning: a probe on a second task, the base backbone vs the fine-tuned one.

MusicFM's authors warn that fine-tuning on one task can cost the representation elsewhere. This
scores hidden state ``layer`` (7 by default, the layer the pipeline stores for most tasks) of both
checkpoints on the same labelled tracks with the same simple probe (standardised features,
logistic regression, stratified k-fold accuracy, fixed seed). Track vectors come from
:func:`pipeline.engine.inference.embed_uri` (the pipeline's decode, windowing and pooling), one
track at a time in this process: meant for an evaluation set of hundreds of tracks, not a catalog.

The probe is the project's one probe trainer: :func:`pipeline.insights.probe_models.cross_validate`
with its ``linear`` estimator (L2 logistic regression, the strength chosen inside each fold), the
same folds for both checkpoints. The score is the out-of-fold accuracy; the change (after −
before) has a 95 % paired bootstrap interval over the tracks.

``jobs/evaluate.py --mode finetune --forgetting-task TASK`` writes the report into
``results.json`` (``forgetting``) and ``results.md`` (:func:`write_forgetting`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.evaluate.finetune_spec import LabelledTrack


@dataclass(frozen=True)
class ForgettingReport:
    """Probe accuracy of ``layer`` before (``base_score``) and after (``finetuned_score``)."""

    layer: int
    base_score: float
    finetuned_score: float
    base_model_id: str
    finetuned_model_id: str
    folds: int
    metric: str = "accuracy"
    task: str = ""
    tracks: int = 0
    change_ci95: tuple[float, float] | None = None

    @property
    def change(self) -> float:
        """Fine-tuned minus base: negative means the second task got worse (forgetting)."""
        return self.finetuned_score - self.base_score

    def as_dict(self) -> dict[str, Any]:
        """The ``forgetting`` object of ``results.json``."""
        ci = list(self.change_ci95) if self.change_ci95 is not None else None
        return {"task": self.task, "layer": self.layer, "metric": self.metric, "before": self.base_score,
                "after": self.finetuned_score, "delta": self.change, "delta_ci95": ci, "folds": self.folds,
                "tracks": self.tracks, "base_model_id": self.base_model_id,
                "finetuned_model_id": self.finetuned_model_id}  # fmt: skip


def probe_correct(
    features: np.ndarray, labels: np.ndarray, seed: int = 0, folds: int = 5
) -> tuple[np.ndarray, int]:
    """Out-of-fold correctness (n,) bool of the shared linear probe on ``features`` (n, D) in
    stratified k-fold cross-validation, and the number of folds (at most the smallest class's
    size)."""
    from pipeline.insights.probe_models import cross_validate
    from pipeline.insights.probe_settings import FitSettings

    counts = Counter(labels.tolist())
    k = min(folds, min(counts.values()))
    if len(counts) < 2 or k < 2:
        raise ValueError(f"the probe needs at least 2 classes with 2 tracks each, got {dict(counts)}")
    if not np.isfinite(features).all():
        raise ValueError("non-finite features")
    cv = cross_validate(
        features, labels, "multiclass", settings=FitSettings(estimator="linear", folds=k, seed=seed)
    )
    return cv.oof.argmax(1) == labels, len(np.unique(cv.fold[cv.scored]))


def probe_score(features: np.ndarray, labels: np.ndarray, seed: int = 0, folds: int = 5) -> tuple[float, int]:
    """Mean out-of-fold accuracy of :func:`probe_correct` and the number of folds."""
    correct, k = probe_correct(features, labels, seed, folds)
    return float(correct.mean()), k


def paired_change_ci(
    before: np.ndarray, after: np.ndarray, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of mean(after) - mean(before) over the same tracks."""
    rng = np.random.default_rng(seed)
    d = after.astype(np.float64) - before.astype(np.float64)  # (n,)
    draws = [float(d[rng.integers(0, len(d), len(d))].mean()) for _ in range(resamples)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def track_features(
    checkpoint: str,
    tracks: Sequence[LabelledTrack],
    layer: int,
    stats: str | None = None,
    model_config: str | None = None,
    window_s: float = 30.0,
    storage_options: dict | None = None,
) -> tuple[np.ndarray, str]:
    """(n, D) track vectors of hidden state ``layer`` and the model_id of ``checkpoint``."""
    from pipeline.engine.inference import embed_uri, load_model

    model = load_model(checkpoint, stats, model_config, device="cpu", storage_options=storage_options)
    if layer > model.config.encoder_depth:
        raise ValueError(f"layer {layer} exceeds the depth {model.config.encoder_depth} of {checkpoint}")
    vecs = [
        embed_uri(
            t.uri, model, [layer], window_s=window_s, hop_s=window_s, storage_options=storage_options
        ).track[layer]
        for t in tracks
    ]
    return np.stack(vecs).astype(np.float32), model.model_id


def forgetting(
    base: str,
    finetuned: str,
    tracks: Sequence[LabelledTrack],
    *,
    layer: int = 7,
    stats: str | None = None,
    model_config: str | None = None,
    window_s: float = 30.0,
    folds: int = 5,
    seed: int = 0,
    storage_options: dict | None = None,
    task: str = "",
    resamples: int = 1000,
) -> ForgettingReport:
    """Probe scores of ``layer`` of ``base`` (as ``--checkpoint``; ``stats`` / ``model_config``
    are its flags) and of ``finetuned`` (the ``.safetensors`` of :func:`run_finetune`) on
    ``tracks`` (the second task's labels), with the paired bootstrap interval of the change."""
    if not tracks:
        raise ValueError("forgetting needs labelled tracks of a second task")
    labels = np.array([t.label for t in tracks], np.int64)
    x_base, base_id = track_features(base, tracks, layer, stats, model_config, window_s, storage_options)
    x_ft, ft_id = track_features(finetuned, tracks, layer, None, None, window_s, storage_options)
    before, k = probe_correct(x_base, labels, seed, folds)
    after, _ = probe_correct(x_ft, labels, seed, folds)
    ci = paired_change_ci(before, after, resamples, seed)
    return ForgettingReport(layer, float(before.mean()), float(after.mean()), base_id, ft_id, k,
                            task=task, tracks=len(tracks), change_ci95=ci)  # fmt: skip


def forgetting_tracks(
    task_name: str, dataset: str, data_home: str | None = None, version: str | None = None,
    label_column: str | None = None, seed: int = 0,
) -> list[LabelledTrack]:  # fmt: skip
    """Every track of ``dataset`` with its class for the track-level single-label ``task_name``
    (genre or key); the dataset is read and checked against the task before any work."""
    from pipeline.evaluate.datasets import load_dataset, stratum
    from pipeline.evaluate.tasks import get_task

    if task_name not in ("genre", "key"):
        raise ValueError(f"--forgetting-task scores track labels: genre or key, not {task_name}")
    task = get_task(task_name)
    ds = load_dataset(
        dataset, task, data_home=data_home, version=version, label_column=label_column, seed=seed
    )
    classes = sorted({stratum(task, t.ref) for t in ds.tracks})
    return [LabelledTrack(t.audio, classes.index(stratum(task, t.ref))) for t in ds.tracks]


def write_forgetting(res: dict[str, Any], report: ForgettingReport) -> None:
    """Add the report to ``res`` and to its ``results.json`` and ``results.md``."""
    res["forgetting"] = report.as_dict()
    with open(res["outputs"]["json"], "w") as f:
        json.dump(res, f, indent=1, default=float)
    lo, hi = report.change_ci95 or (float("nan"), float("nan"))
    with open(res["outputs"]["md"], "a") as f:
        f.write(
            f"\n## Forgetting\n\nLayer {report.layer} on {report.task} ({report.tracks} tracks, "
            f"{report.folds}-fold cross-validated {report.metric} of the linear probe): base "
            f"{report.base_model_id} {100 * report.base_score:.1f} %, fine-tuned {report.finetuned_model_id} "
            f"{100 * report.finetuned_score:.1f} %, change {100 * report.change:+.1f} points "
            f"(95 % paired bootstrap over tracks {100 * lo:+.1f} .. {100 * hi:+.1f}).\n"
        )
