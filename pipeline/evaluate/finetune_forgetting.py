"""Forgetting after fine-tuning: a probe on a second task, the base backbone vs the fine-tuned one.

MusicFM's authors warn that fine-tuning on one task can cost the representation elsewhere. This
scores hidden state ``layer`` (7 by default, the layer the pipeline stores for most tasks) of both
checkpoints on the same labelled tracks with the same simple probe (standardised features,
logistic regression, stratified k-fold accuracy, fixed seed). Track vectors come from
:func:`pipeline.engine.inference.embed_uri` (the pipeline's decode, windowing and pooling), one
track at a time in this process: meant for an evaluation set of hundreds of tracks, not a catalog.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

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

    @property
    def change(self) -> float:
        """Fine-tuned minus base: negative means the second task got worse (forgetting)."""
        return self.finetuned_score - self.base_score


def probe_score(features: np.ndarray, labels: np.ndarray, seed: int = 0, folds: int = 5) -> tuple[float, int]:
    """Mean stratified k-fold accuracy of a logistic-regression probe on ``features`` (n, D),
    and the number of folds used (at most the smallest class's size)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = Counter(labels.tolist())
    k = min(folds, min(counts.values()))
    if len(counts) < 2 or k < 2:
        raise ValueError(f"the probe needs at least 2 classes with 2 tracks each, got {dict(counts)}")
    if not np.isfinite(features).all():
        raise ValueError("non-finite features")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, features, labels, cv=cv, scoring="accuracy").mean()), k


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
) -> ForgettingReport:
    """Probe scores of ``layer`` of ``base`` (as ``--checkpoint``; ``stats`` / ``model_config``
    are its flags) and of ``finetuned`` (the ``.safetensors`` of :func:`run_finetune`) on
    ``tracks`` (the second task's labels)."""
    if not tracks:
        raise ValueError("forgetting needs labelled tracks of a second task")
    labels = np.array([t.label for t in tracks], np.int64)
    x_base, base_id = track_features(base, tracks, layer, stats, model_config, window_s, storage_options)
    x_ft, ft_id = track_features(finetuned, tracks, layer, None, None, window_s, storage_options)
    before, k = probe_score(x_base, labels, seed, folds)
    after, _ = probe_score(x_ft, labels, seed, folds)
    return ForgettingReport(layer, before, after, base_id, ft_id, k)
