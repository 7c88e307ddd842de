"""Scores with the field's own definitions: ``mir_eval`` for beat / downbeat (F-measure, 70 ms
window), chord (majmin, mirex), key (weighted score) and structure (boundary hit rate at 0.5 s
and 3 s), scikit-learn for tagging (macro ROC-AUC and average precision) and genre (accuracy).

A prediction (:class:`Prediction`) is the decoded output for one track: event times, labelled
intervals, a key, or tag probabilities. Per-track metrics are averaged over tracks; tagging's
are computed over the whole test set. :func:`bootstrap` gives confidence intervals by
resampling tracks, :func:`paired_bootstrap` the difference of two models on the same tracks.
Predictions are written as JAMS (:func:`write_jams`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.evaluate.tasks import Reference, Task, events_of


@dataclass(frozen=True)
class Prediction:
    """One track's decoded prediction (only the task's fields are set)."""

    events: np.ndarray | None = None  # beat / downbeat times (s)
    intervals: np.ndarray | None = None  # (M, 2) chord / segment intervals
    labels: tuple[str, ...] | None = None
    key: str | None = None
    scores: np.ndarray | None = None  # (C,) tag / genre probabilities
    tag_names: tuple[str, ...] | None = None


def track_metrics(task: Task, ref: Reference, pred: Prediction) -> dict[str, float]:
    """mir_eval's scores of one track (frame and key tasks; genre accuracy)."""
    import mir_eval

    if task.name in ("beat", "downbeat"):
        ref_ev, est = events_of(task, ref), np.asarray(pred.events, np.float64)
        return {"f_measure": float(mir_eval.beat.f_measure(ref_ev, est, f_measure_threshold=0.07))}
    if task.name == "chord":
        s = mir_eval.chord.evaluate(np.asarray(ref.intervals), list(ref.labels or ()),
                                    np.asarray(pred.intervals), list(pred.labels or ()))  # fmt: skip
        return {"majmin": float(s["majmin"]), "mirex": float(s["mirex"])}
    if task.name == "structure":
        ref_iv, est_iv = np.asarray(ref.intervals), np.asarray(pred.intervals)
        return {
            "hr_0.5": float(mir_eval.segment.detection(ref_iv, est_iv, window=0.5, trim=False)[2]),
            "hr_3": float(mir_eval.segment.detection(ref_iv, est_iv, window=3.0, trim=False)[2]),
        }
    if task.name == "key":
        return {"weighted_score": float(mir_eval.key.weighted_score(ref.key, pred.key))}
    if task.name == "genre":
        names = pred.tag_names or ()
        return {"accuracy": float(names[int(np.argmax(pred.scores))] == (ref.tags or ("",))[0])}
    raise ValueError(f"task {task.name} has no per-track metrics")


class Scores:
    """The metrics of a set of tracks, computable for any resample of them (``value(idx)``)."""

    def __init__(self, task: Task, refs: Sequence[Reference], preds: Sequence[Prediction]) -> None:
        if len(refs) != len(preds) or not refs:
            raise ValueError(
                f"need as many predictions as references (> 0), got {len(preds)} and {len(refs)}"
            )
        self.task, self.n = task, len(refs)
        self.per_track: dict[str, np.ndarray] = {}
        if task.name == "tagging":
            names = preds[0].tag_names or ()
            self.y_true = np.array([[n in (r.tags or ()) for n in names] for r in refs], np.int64)  # (N, C)
            self.y_score = np.stack([np.asarray(p.scores, np.float64) for p in preds])  # (N, C)
        else:
            rows = [track_metrics(task, r, p) for r, p in zip(refs, preds, strict=True)]
            self.per_track = {k: np.array([row[k] for row in rows]) for k in rows[0]}

    def value(self, idx: np.ndarray | None = None) -> dict[str, float]:
        idx = np.arange(self.n) if idx is None else idx
        if self.per_track:
            return {k: float(v[idx].mean()) for k, v in self.per_track.items()}
        return tagging_metrics(self.y_true[idx], self.y_score[idx])


def tagging_metrics(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Macro ROC-AUC and average precision over the tags that have both positives and negatives
    in ``y_true`` (scikit-learn); NaN when no tag has both."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    pos = y_true.sum(0)
    ok = (pos > 0) & (pos < len(y_true))
    if not ok.any():
        return {"roc_auc": float("nan"), "average_precision": float("nan")}
    return {
        "roc_auc": float(roc_auc_score(y_true[:, ok], y_score[:, ok], average="macro")),
        "average_precision": float(average_precision_score(y_true[:, ok], y_score[:, ok], average="macro")),
    }


def bootstrap(
    value: Callable[[np.ndarray], dict[str, float]],
    n: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile interval of each metric over ``resamples`` resamples of the ``n`` tracks."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        for k, v in value(rng.integers(0, n, n)).items():
            draws.setdefault(k, []).append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: [float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))] for k, v in draws.items()}


def paired_bootstrap(
    a: Scores, b: Scores, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict]:
    """Difference a - b of each metric on the same tracks: the observed difference, its
    percentile interval over track resamples (both models on the same resample), and the share
    of resamples where a is better."""
    if a.n != b.n:
        raise ValueError(f"paired comparison needs the same tracks, got {a.n} and {b.n}")
    rng = np.random.default_rng(seed)
    obs_a, obs_b = a.value(), b.value()
    diffs: dict[str, list[float]] = {k: [] for k in obs_a}
    for _ in range(resamples):
        idx = rng.integers(0, a.n, a.n)
        va, vb = a.value(idx), b.value(idx)
        for k in diffs:
            diffs[k].append(va[k] - vb[k])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        k: {
            "a": obs_a[k],
            "b": obs_b[k],
            "diff": obs_a[k] - obs_b[k],
            "ci": [float(np.nanpercentile(d, lo)), float(np.nanpercentile(d, hi))],
            "p_a_better": float(np.mean(np.asarray(d) > 0)),
        }  # fmt: skip
        for k, d in diffs.items()
    }


# --------------------------------------------------------------------------- JAMS


def write_jams(path: str, task: Task, pred: Prediction, duration: float, model_id: str, layer: str) -> None:
    """One track's prediction as a JAMS file (namespaces beat, chord, segment_open, key_mode,
    tag_open)."""
    import jams

    jam = jams.JAMS()
    jam.file_metadata.duration = float(duration)
    meta = jams.AnnotationMetadata(
        annotator={"model_id": model_id, "layer": layer}, data_source="musicfm probe"
    )
    if task.name in ("beat", "downbeat"):
        ann = jams.Annotation("beat", annotation_metadata=meta)
        for t in np.asarray(pred.events, np.float64):
            ann.append(time=float(t), duration=0.0, value=1 if task.name == "downbeat" else None)
    elif task.name in ("chord", "structure"):
        ann = jams.Annotation("chord" if task.name == "chord" else "segment_open", annotation_metadata=meta)
        for (a, b), lab in zip(np.asarray(pred.intervals), pred.labels or (), strict=True):
            ann.append(time=float(a), duration=float(b - a), value=lab)
    elif task.name == "key":
        ann = jams.Annotation("key_mode", annotation_metadata=meta)
        ann.append(time=0.0, duration=float(duration), value=pred.key.replace(" ", ":") if pred.key else "N")
    else:
        ann = jams.Annotation("tag_open", annotation_metadata=meta)
        for name, s in zip(pred.tag_names or (), np.asarray(pred.scores), strict=True):
            ann.append(time=0.0, duration=float(duration), value=name, confidence=float(s))
    jam.annotations.append(ann)
    jam.save(path, strict=True)


def read_jams_prediction(path: str, task: Task) -> Prediction:
    """A prediction saved by :func:`write_jams`, read back (for checking scores against it)."""
    import jams

    ann = jams.load(path, validate=False).annotations[0]
    obs = list(ann.data)
    if task.name in ("beat", "downbeat"):
        return Prediction(events=np.array([o.time for o in obs], np.float64))
    if task.name in ("chord", "structure"):
        iv, labels = ann.to_interval_values()
        return Prediction(intervals=np.asarray(iv).reshape(-1, 2), labels=tuple(labels))
    if task.name == "key":
        return Prediction(key=str(obs[0].value).replace(":", " "))
    return Prediction(
        scores=np.array([o.confidence for o in obs]), tag_names=tuple(str(o.value) for o in obs)
    )
