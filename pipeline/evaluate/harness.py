"""The probe evaluation of one (dataset, task, features): targets from the references, every
layer's probe (and the learned layer weights) trained in one pass, the test split decoded to
events the standard way and scored, with bootstrap intervals over tracks; predictions as JAMS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate.datasets import EvalDataset, EvalTrack
from pipeline.evaluate.features import Features
from pipeline.evaluate.metrics import Prediction, Scores, bootstrap, track_metrics, write_jams
from pipeline.evaluate.probe import LayerProbes, ProbeConfig, fit_layer_probes
from pipeline.evaluate.tasks import (
    CHORD_VOCAB,
    KEY_VOCAB,
    Task,
    beat_targets,
    chord_class,
    events_of,
    interval_targets,
    key_class,
    merge_frames,
    pick_peaks,
)

#: Peak-picking thresholds tried on the validation split (beat, downbeat).
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class HeadResult:
    """One probe head's test scores: metrics, their intervals, and the per-track data behind them."""

    metrics: dict[str, float]
    ci: dict[str, list[float]]
    scores: Scores
    threshold: float | None = None
    epochs: int = 0


@dataclass
class Evaluation:
    task: Task
    vocab: tuple[str, ...]
    heads: dict[str, HeadResult] = field(default_factory=dict)
    layer_weights: list[float] = field(default_factory=list)
    test_ids: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)


def vocabulary(task: Task, ds: EvalDataset) -> tuple[str, ...]:
    """Class names of the probe's outputs (beat/downbeat: one binary output)."""
    if task.name == "chord":
        return CHORD_VOCAB
    if task.name == "key":
        return KEY_VOCAB
    if task.name == "structure":
        return ("N", *sorted({lab for t in ds.tracks for lab in (t.ref.labels or ())} - {"N"}))
    if task.name in ("genre", "tagging"):
        return tuple(sorted({tag for t in ds.tracks for tag in (t.ref.tags or ())}))
    return ("beat",)


def targets(task: Task, track: EvalTrack, vocab: tuple[str, ...], times: np.ndarray | None) -> np.ndarray:
    """Probe targets of one track: (T,) per frame for frame tasks, one row for track tasks."""
    ref = track.ref
    if task.name in ("beat", "downbeat"):
        return beat_targets(times, events_of(task, ref), float(task.frames_hz or 1.0))
    if task.name == "chord":
        return interval_targets(times, ref.intervals, [chord_class(x) for x in ref.labels or ()], 0)
    if task.name == "structure":
        return interval_targets(times, ref.intervals, [vocab.index(x) for x in ref.labels or ()], 0)
    if task.name == "key":
        return np.array([key_class(ref.key or "")])
    if task.name == "genre":
        return np.array([vocab.index((ref.tags or ("",))[0])])
    return np.array([[float(v in (ref.tags or ())) for v in vocab]], np.float32)


def split_arrays(
    task: Task, tracks: list[EvalTrack], feats: Features, vocab: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(N, L, D) features and their targets over all frames (or tracks) of ``tracks``."""
    xs, ys = [], []
    for t in tracks:
        if task.level == "frame":
            times, x = feats.frames[t.track_id]
            xs.append(x)
            ys.append(targets(task, t, vocab, times))
        else:
            xs.append(feats.tracks[t.track_id][None])
            ys.append(targets(task, t, vocab, None))
    return np.concatenate(xs), np.concatenate(ys)


def decode(
    task: Task, probs: np.ndarray, times: np.ndarray | None, vocab: tuple[str, ...], threshold: float
) -> Prediction:
    """One head's output for one track -> a prediction: peaks for beats, merged framewise labels
    for chords and segments, the argmax key, tag / genre probabilities."""
    hz = float(task.frames_hz or 1.0)
    if task.name in ("beat", "downbeat"):
        return Prediction(events=pick_peaks(probs[:, 0], times, threshold, hz))
    if task.name in ("chord", "structure"):
        iv, labels = merge_frames(probs.argmax(-1), times, hz, vocab)
        return Prediction(intervals=iv, labels=tuple(labels))
    if task.name == "key":
        return Prediction(key=vocab[int(probs[0].argmax())])
    return Prediction(scores=probs[0].astype(np.float64), tag_names=vocab)


def head_outputs(
    probes: LayerProbes, task: Task, tracks: list[EvalTrack], feats: Features
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per track: ((T or 1, H, C) probabilities, frame times or None)."""
    out = []
    for t in tracks:
        if task.level == "frame":
            times, x = feats.frames[t.track_id]
            out.append((probes.predict(x), times))
        else:
            out.append((probes.predict(feats.tracks[t.track_id][None]), None))
    return out


def best_threshold(
    task: Task, tracks: list[EvalTrack], outs: list, head: int, vocab: tuple[str, ...]
) -> float | None:
    """The peak-picking threshold with the best mean F-measure on the validation tracks."""
    if task.name not in ("beat", "downbeat"):
        return None
    mean_f = []
    for thr in THRESHOLDS:
        f = [
            track_metrics(task, t.ref, decode(task, p[:, head], tm, vocab, thr))["f_measure"]
            for t, (p, tm) in zip(tracks, outs, strict=True)
        ]
        mean_f.append(float(np.mean(f)))
    return THRESHOLDS[int(np.argmax(mean_f))]


def evaluate_probe(
    ds: EvalDataset,
    task: Task,
    feats: Features,
    config: ProbeConfig,
    jams_dir: str | None = None,
    resamples: int = 1000,
) -> Evaluation:
    """Train every layer's probe on the train split (early stopping on valid), score the test
    split per head; tracks the embed could not read (``feats.errors``) are left out."""
    have = set(feats.frames if task.level == "frame" else feats.tracks)
    split = {s: [t for t in ds.split(s) if t.track_id in have] for s in ("train", "valid", "test")}
    if not all(split.values()):
        sizes = ", ".join(f"{s} {len(v)}" for s, v in split.items())
        raise ValueError(f"after leaving out unreadable tracks a split is empty ({sizes})")
    vocab = vocabulary(task, ds)
    xt, yt = split_arrays(task, split["train"], feats, vocab)
    xv, yv = split_arrays(task, split["valid"], feats, vocab)
    probes = fit_layer_probes(xt, yt, xv, yv, task.output, len(vocab), config, feats.layers)
    valid_out = head_outputs(probes, task, split["valid"], feats)
    test_out = head_outputs(probes, task, split["test"], feats)
    result = Evaluation(task, vocab, layer_weights=probes.layer_weights,
                        test_ids=[t.track_id for t in split["test"]], sizes={s: len(v) for s, v in split.items()})  # fmt: skip
    refs = [t.ref for t in split["test"]]
    for h, name in enumerate(probes.heads):
        thr = best_threshold(task, split["valid"], valid_out, h, vocab)
        preds = [decode(task, p[:, h], tm, vocab, thr or 0.5) for p, tm in test_out]
        scores = Scores(task, refs, preds)
        result.heads[name] = HeadResult(scores.value(), bootstrap(scores.value, scores.n, resamples, config.seed),
                                        scores, thr, probes.epochs[h])  # fmt: skip
        if jams_dir:
            os.makedirs(os.path.join(jams_dir, name), exist_ok=True)
            for t, pred in zip(split["test"], preds, strict=True):
                path = os.path.join(jams_dir, name, t.track_id.replace("/", "__") + ".jams")
                write_jams(path, task, pred, feats.durations.get(t.track_id, 0.0), feats.model_id, name)
    return result
