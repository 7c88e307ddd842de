"""Scores of a probe's predictions (scikit-learn's definitions) and their confidence intervals.

* :func:`score` — multiclass: accuracy and macro-F1; multilabel: ROC-AUC and average precision
  (macro over the labels with both classes among the scored rows); regression: R² (uniform
  average over targets). ``pred`` is what :meth:`FittedProbe.predict_proba` returns.
* :func:`bootstrap_ci` — the percentile interval of each score over ``n`` resamples of the rows
  (tracks) with replacement, seeded: the interval the cross-validated and held-out estimates
  are reported with.
* :func:`majority_score` — the score of always predicting the most frequent class (the floor a
  probe must beat).
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_precision", "bootstrap_ci", "majority_score", "r2", "roc_auc", "score"]


def score(task: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics of predictions ``pred`` (N, C) for targets ``y`` ((N,) class index, (N, C) 0/1 or
    (N, C) values); ``{}`` for no rows. Computed in numpy with scikit-learn's definitions (macro-F1
    over the classes present in ``y`` or predicted; ROC-AUC with tied scores ranked on average;
    average precision as ``sklearn.metrics.average_precision_score``; R² uniform average, 1 for a
    constant target predicted exactly, else 0) — fast enough to bootstrap."""
    if len(y) == 0:
        return {}
    if task == "multiclass":
        return _class_scores(y.astype(np.int64), pred.argmax(1))
    if task == "multilabel":
        ok = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
        if not ok:
            return {"labels_scored": 0}
        return {
            "roc_auc": float(np.mean([roc_auc(y[:, j], pred[:, j]) for j in ok])),
            "average_precision": float(np.mean([average_precision(y[:, j], pred[:, j]) for j in ok])),
            "labels_scored": len(ok),
        }
    return {"r2": r2(y.reshape(len(y), -1), pred.reshape(len(y), -1))}


def _class_scores(y: np.ndarray, hat: np.ndarray) -> dict[str, float]:
    labels = np.unique(np.concatenate([y, hat]))
    tp = np.array([np.sum((hat == c) & (y == c)) for c in labels], np.float64)
    n_pred = np.array([np.sum(hat == c) for c in labels], np.float64)
    n_true = np.array([np.sum(y == c) for c in labels], np.float64)
    f1 = 2 * tp / np.maximum(n_pred + n_true, 1)
    return {"accuracy": float(np.mean(hat == y)), "macro_f1": float(f1.mean())}


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney; ties count one half)."""
    from scipy.stats import rankdata

    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, highest first."""
    order = np.argsort(-s, kind="mergesort")
    ys, ss = (y[order] > 0.5).astype(np.float64), s[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # the last row of each distinct score
    tp = np.cumsum(ys)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def r2(y: np.ndarray, p: np.ndarray) -> float:
    ss_res = np.square(y - p).sum(0)
    ss_tot = np.square(y - y.mean(0)).sum(0)
    per = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), np.where(ss_res == 0, 1.0, 0.0))
    return float(per.mean())


def bootstrap_ci(
    task: str, y: np.ndarray, pred: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """``{metric: [low, high]}``: percentile interval of each float metric of :func:`score` over
    ``n`` resamples of the rows with replacement (resamples where a metric is undefined, e.g. a
    single class left for ROC-AUC, are skipped for it)."""
    if len(y) < 2:
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        for k, v in score(task, y[idx], pred[idx]).items():
            if isinstance(v, float) and np.isfinite(v):
                samples.setdefault(k, []).append(v)
    a = (1.0 - level) / 2.0
    return {
        k: [round(float(np.quantile(v, a)), 4), round(float(np.quantile(v, 1.0 - a)), 4)]
        for k, v in samples.items()
    }


def majority_score(task: str, y_train: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Score of predicting the training rows' most frequent class (multiclass; its prevalence per
    label for multilabel, the mean for regression) for every test row."""
    if task == "multiclass":
        n_out = int(max(y_train.max(), y_test.max())) + 1
        counts = np.bincount(y_train.astype(np.int64), minlength=n_out)
        pred = np.zeros((len(y_test), n_out), np.float32)
        pred[:, int(np.argmax(counts))] = 1.0
    else:
        pred = np.repeat(y_train.reshape(len(y_train), -1).mean(0, keepdims=True), len(y_test), 0)
    return score(task, y_test, pred)
