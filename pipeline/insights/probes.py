"""Probes on frozen layers: label the catalog from a few labelled tracks, or from many.

:func:`train_probe` joins a labels file (see :mod:`pipeline.insights.probe_data`) with the stored
layer vectors and fits the one probe implementation, :func:`pipeline.insights.probe_models.fit_probe`
(pure numpy; the same function serves frame-level evaluation). The default protocol follows the
number of labelled tracks ``n`` (``FitSettings.linear_max_labels``, 1,000 by default):

* ``n`` below it: a **regularised linear model** on standardised vectors (L2 logistic regression
  with balanced class weights; ridge for regression), its strength chosen by stratified 5-fold
  cross-validation over all the labelled tracks, then refitted on all of them. The reported
  metric is the **cross-validated** estimate: nested (each outer fold chooses its own strength
  on its training folds), pooled over the out-of-fold predictions, with a 95 % bootstrap
  interval over tracks (``metrics_ci95``) and the majority-class score beside it.
* ``n`` from it on: the **MARBLE MLP** (learned softmax layer weights, 512 ReLU units, dropout
  0.2, Adam, plateau schedule, early stopping on a 10 % validation split, then refitted on
  training + validation for the chosen number of epochs); metric on a held-out stratified 20 %
  test split, with its bootstrap interval.

``--estimator linear|mlp`` forces the estimator (the evaluation protocol still follows ``n``);
``--head linear`` gives the MLP no hidden layer (MARBLE's linear probe). A class with a single
labelled track is kept in training (it is never in a test fold or split) and listed in the
card's ``single_example_classes``. At window level (``level="window"``) every window of a
labelled track is a row, folds and splits are by track, and a track's prediction is the mean of
its windows'.

A probe directory holds ``probe.safetensors`` (the arrays of the fitted model) and ``probe.json``
(the card: name, task, labels, layers, estimator, ``model_id``, ``settings_id``, metrics and how
they were estimated, split sizes, layer weights, settings). :class:`Probe` loads it again
(safetensors, no pickle; format-1 MLP probes too).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from pipeline.insights.probe_data import LabelError, Labels, load_labels, read_features
from pipeline.insights.probe_metrics import bootstrap_ci, majority_score, score
from pipeline.insights.probe_mlp import train_threads
from pipeline.insights.probe_models import (
    FittedProbe,
    cross_validate,
    fit_probe,
    stratified_folds,
    task_strata,
)
from pipeline.insights.probe_settings import ESTIMATORS, LINEAR_MAX_LABELS, TASKS, FitSettings

__all__ = [
    "CARD_FILE",
    "ESTIMATORS",
    "HEADS",
    "TASKS",
    "WEIGHTS_FILE",
    "LabelError",
    "Probe",
    "ProbeSettings",
    "load_labels",
    "read_features",
    "train_probe",
    "train_threads",
]

HEADS = ("linear", "mlp")
CARD_FILE = "probe.json"
WEIGHTS_FILE = "probe.safetensors"


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe is trained (recorded in its card): the store side (task, layers, level, test
    split) and the estimator's settings (see :class:`FitSettings`)."""

    task: str = "multiclass"
    layers: tuple[int, ...] = (7, 12)
    estimator: str = "auto"
    head: str = "mlp"  # the MLP's head: one hidden layer (mlp) or none (linear)
    # the estimator's defaults are FitSettings' (one default per knob)
    hidden: int = FitSettings.hidden
    dropout: float = FitSettings.dropout
    lr: float = FitSettings.lr
    batch_size: int = FitSettings.batch_size
    max_epochs: int = FitSettings.max_epochs
    patience: int = FitSettings.patience
    plateau_patience: int = FitSettings.plateau_patience
    val_fraction: float = FitSettings.val_fraction
    test_fraction: float = 0.2  # held-out split of the large-label protocol
    folds: int = 5
    linear_max_labels: int = LINEAR_MAX_LABELS
    level: str = "track"
    seed: int = 0
    min_delta: float = 1e-4
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be linear or mlp, got {self.head!r}")
        if self.level not in ("track", "window"):
            raise ValueError(f"level must be track or window, got {self.level!r}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct and non-empty, got {self.layers}")
        if not 0 < self.test_fraction < 0.5:
            raise ValueError("test_fraction must be in (0, 0.5)")
        self.fit_settings()  # validates the rest

    def fit_settings(self) -> FitSettings:
        return FitSettings(
            estimator=self.estimator, linear_max_labels=self.linear_max_labels, folds=self.folds,
            hidden=0 if self.head == "linear" else self.hidden, dropout=self.dropout, lr=self.lr,
            batch_size=self.batch_size, max_epochs=self.max_epochs, patience=self.patience,
            plateau_patience=self.plateau_patience, min_delta=self.min_delta, val_fraction=self.val_fraction,
            seed=self.seed, threads=self.threads, device=self.device,
        )  # fmt: skip


class Probe:
    """A trained probe: its card (``probe.json``) and fitted model; :meth:`predict` on layer
    vectors (N, L, D) in the card's layer order."""

    def __init__(self, card: dict[str, Any], model: FittedProbe) -> None:
        self.card = card
        self.model = model

    @property
    def task(self) -> str:
        return self.card["task"]

    @property
    def layers(self) -> list[int]:
        return list(self.card["layers"])

    @property
    def labels(self) -> list[str]:
        return list(self.card["labels"])

    def predict(self, x: np.ndarray, batch: int = 8192) -> np.ndarray:
        """(N, L, D) -> class probabilities (N, C), label probabilities (N, C) or values (N, C)."""
        return self.model.predict_proba(x, batch)

    def save(self, out_dir: str) -> None:
        from safetensors.numpy import save_file

        os.makedirs(out_dir, exist_ok=True)
        save_file(self.model.arrays(), os.path.join(out_dir, WEIGHTS_FILE))
        with open(os.path.join(out_dir, CARD_FILE), "w") as f:
            json.dump(self.card, f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, probe_dir: str) -> Probe:
        """Load a probe directory (``probe.json`` + ``probe.safetensors``); ValueError when broken."""
        from safetensors.numpy import load_file

        card_path = os.path.join(probe_dir, CARD_FILE)
        try:
            with open(card_path) as f:
                card = json.load(f)
            arrays = load_file(os.path.join(probe_dir, WEIGHTS_FILE))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the probe in {probe_dir}: {' '.join(str(e).split())}") from None
        need = ("task", "layers", "labels", "dim", "head", "model_id", "settings_id", "name")
        if not isinstance(card, dict) or any(k not in card for k in need):
            raise ValueError(f"{card_path} is not a probe card (needs {', '.join(need)})")
        hidden = card.get("hidden")
        if hidden is None:  # format 1: always the torch net; its head named the hidden layer
            hidden = 0 if card["head"] == "linear" else int(card.get("settings", {}).get("hidden", 512))
        meta = {"task": card["task"], "estimator": card.get("estimator", "mlp"), "hidden": hidden}
        return cls(card, FittedProbe.from_arrays(meta, arrays))


# --------------------------------------------------------------------------- training


@dataclass
class _Rows:
    """Feature rows of the labelled tracks: ``x`` (R, L, D), ``track`` (R,) index into ``y``."""

    x: np.ndarray
    track: np.ndarray
    y: np.ndarray  # (T,) or (T, C): one target per labelled track with vectors
    track_ids: list[str]
    model_id: str
    settings_id: str


def _labelled_rows(
    store: str, lab: Labels, s: ProbeSettings, storage_options: Mapping[str, Any] | None
) -> _Rows:
    feats = read_features(store, s.layers, sorted(set(lab.track_ids)), s.level, storage_options)
    if len(feats.model_ids) > 1 or len(feats.settings_ids) > 1:
        raise LabelError(
            f"the labelled tracks were embedded with several models/settings ({sorted(feats.model_ids)}, "
            f"{sorted(feats.settings_ids)}); a probe is trained on one"
        )
    if not feats.track_ids:
        raise LabelError(f"none of the {len(lab.track_ids)} labelled track ids is in the store")
    present, seen, keep = set(feats.track_ids), set(), []
    for i, t in enumerate(lab.track_ids):  # tracks with a label and vectors, in label order
        if t in present and t not in seen:
            seen.add(t)
            keep.append(i)
    tids = [lab.track_ids[i] for i in keep]
    tix = {t: i for i, t in enumerate(tids)}
    track = np.array([tix[t] for t in feats.track_ids], np.int64)
    return _Rows(
        feats.x, track, lab.y[keep], tids, next(iter(feats.model_ids)), next(iter(feats.settings_ids))
    )


def _per_track(pred: np.ndarray, track: np.ndarray, n: int) -> np.ndarray:
    """Mean of the rows' predictions per track (window level; identity at track level)."""
    out = np.zeros((n, pred.shape[1]), np.float64)
    np.add.at(out, track, pred)
    return (out / np.maximum(np.bincount(track, minlength=n), 1)[:, None]).astype(np.float32)


def _cross_validated(r: _Rows, s: ProbeSettings, fit: FitSettings, n_out: int) -> tuple[dict, np.ndarray]:
    """Nested cross-validated estimate over all labelled tracks; (evaluation facts, fold per track)."""
    cv = cross_validate(r.x, r.y[r.track], s.task, groups=r.track, n_outputs=n_out, settings=fit)
    fold_t = np.full(len(r.y), -1, np.int64)
    fold_t[r.track] = cv.fold
    pred = _per_track(cv.oof, r.track, len(r.y))
    ok = fold_t >= 0
    per_fold = [score(s.task, r.y[fold_t == f], pred[fold_t == f]) for f in np.unique(fold_t[ok])]
    return {
        "protocol": f"{len(per_fold)}-fold cross-validation over all labelled tracks (nested: each fold "
        "fits its own probe, choosing its strength on its training folds)",
        "metrics": score(s.task, r.y[ok], pred[ok]),
        "ci95": bootstrap_ci(s.task, r.y[ok], pred[ok], seed=s.seed),
        "majority": _majority(s.task, r.y, ok),
        "scored_tracks": int(ok.sum()),
        "fold_metrics": per_fold,
        "folds": cv.folds,
    }, fold_t


def _majority(task: str, y: np.ndarray, scored: np.ndarray) -> dict[str, float]:
    return majority_score(task, y, y[scored]) if scored.any() else {}


def _held_out(r: _Rows, s: ProbeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Stratified held-out test split by track: (test mask per track, test mask per row)."""
    k = max(2, round(1 / s.test_fraction))
    fold_t = stratified_folds(task_strata(s.task, r.y), k, s.seed + 1)
    test_t = fold_t == 0
    return test_t, test_t[r.track]


def _fit_final(
    r: _Rows, rows: np.ndarray, s: ProbeSettings, fit: FitSettings, n_out: int
) -> tuple[FittedProbe, float]:
    t = time.perf_counter()
    model = fit_probe(
        r.x[rows], r.y[r.track[rows]], s.task, groups=r.track[rows], n_outputs=n_out, settings=fit
    )
    return model, time.perf_counter() - t


def train_probe(
    store: str,
    labels_path: str,
    settings: ProbeSettings,
    out_dir: str | None = None,
    name: str | None = None,
    label_columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> Probe:
    """Train a probe on the store's vectors for the labels file (protocol: module doc); save it
    to ``out_dir``."""
    t0 = time.perf_counter()
    s = replace(settings, device=device) if device else settings
    lab = load_labels(labels_path, s.task, label_columns)
    r = _labelled_rows(store, lab, s, storage_options)
    n_out = len(lab.labels)
    n = len(r.y)
    fit = s.fit_settings()
    fit = replace(fit, estimator=fit.choose(n))
    if n < fit.linear_max_labels:
        evaluation, _ = _cross_validated(r, s, fit, n_out)
        model, t_fit = _fit_final(r, np.ones(len(r.x), bool), s, fit, n_out)
        splits = {"train": n, "val": 0, "test": 0}
        train_t = np.ones(n, bool)
    else:
        test_t, test_r = _held_out(r, s)
        model, t_fit = _fit_final(r, ~test_r, s, fit, n_out)
        pred = _per_track(model.predict_proba(r.x[test_r]), np.searchsorted(np.flatnonzero(test_t), r.track[test_r]), int(test_t.sum()))  # fmt: skip
        yt = r.y[test_t]
        evaluation = {
            "protocol": f"held-out stratified test split ({test_t.sum()} tracks), model fitted on the other {n - test_t.sum()}",
            "metrics": score(s.task, yt, pred), "ci95": bootstrap_ci(s.task, yt, pred, seed=s.seed),
            "majority": majority_score(s.task, r.y[~test_t], yt), "scored_tracks": int(test_t.sum()),
        }  # fmt: skip
        val = int(model.info.get("val_groups", 0))
        splits = {"train": int((~test_t).sum()) - val, "val": val, "test": int(test_t.sum())}
        train_t = ~test_t
    pred_train = _per_track(model.predict_proba(r.x[train_t[r.track]]),
                            np.searchsorted(np.flatnonzero(train_t), r.track[train_t[r.track]]), int(train_t.sum()))  # fmt: skip
    facts = {"evaluation": evaluation, "splits": splits, "fit_s": t_fit,
             "metrics_train": score(s.task, r.y[train_t], pred_train)}  # fmt: skip
    probe = Probe(_card(lab, r, s, model, facts, labels_path, name, t0), model)
    if out_dir:
        probe.save(out_dir)
    return probe


def _single_example_classes(task: str, y: np.ndarray, labels: list[str]) -> dict[str, int]:
    if task == "multiclass":
        counts = np.bincount(y.astype(np.int64), minlength=len(labels))
    elif task == "multilabel":
        counts = (y > 0.5).sum(0).astype(np.int64)
    else:
        return {}
    return {labels[i]: int(c) for i, c in enumerate(counts) if c == 1}


def _card(lab: Labels, r: _Rows, s: ProbeSettings, model: FittedProbe, facts: dict, labels_path: str,
          name: str | None, t0: float) -> dict[str, Any]:  # fmt: skip
    ev = facts["evaluation"]
    single = _single_example_classes(s.task, r.y, lab.labels)
    return {
        "format": 2,
        "name": _safe_name(name or (lab.columns[0] if len(lab.columns) == 1 else "tags")),
        "task": s.task, "level": s.level, "labels": lab.labels, "label_columns": lab.columns,
        "layers": list(s.layers), "dim": int(r.x.shape[2]), "estimator": model.estimator,
        "head": "linear" if model.estimator == "linear" or model.hidden == 0 else "mlp", "hidden": model.hidden,
        "model_id": r.model_id, "settings_id": r.settings_id,
        "metrics": ev["metrics"], "metrics_ci95": ev["ci95"], "metrics_majority": ev["majority"],
        "metrics_train": facts["metrics_train"], "evaluation": {k: v for k, v in ev.items() if k not in ("metrics", "ci95", "majority")},
        "labelled_tracks": len(r.y), "splits": facts["splits"],
        "rows": {"train": int(len(r.x))},
        "single_example_classes": single,
        "notes": [f"classes with a single labelled track ({', '.join(single)}) are kept in training in every fold "
                  "and split; they are never scored"] if single else [],
        "layer_weights": {str(lay): round(w, 6) for lay, w in zip(s.layers, model.layer_weights, strict=True)},
        "strength": model.info.get("strength"), "epochs": model.info.get("epochs"),
        "threads": model.info.get("threads", 1), "fit_s": round(facts["fit_s"], 3),
        "settings": asdict(s), "labels_file": os.path.basename(labels_path),
        "train_s": round(time.perf_counter() - t0, 3),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }  # fmt: skip


def _safe_name(name: str) -> str:
    s = re.sub(r"[^a-z0-9_]+", "_", name.strip().lower()).strip("_")
    return s or "probe"
