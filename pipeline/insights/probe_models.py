"""The one probe implementation: pure functions over numpy arrays, used by the track-level
probes (:mod:`pipeline.insights.probes`, ``jobs/train_probe.py``) and by frame-level evaluation.

API::

    fit_probe(x, y, task, *, groups=None, validation=None, n_outputs=None,
              settings=FitSettings(), head_layers=None) -> FittedProbe
    cross_validate(x, y, task, *, groups=None, n_outputs=None, settings=FitSettings(),
                   estimator=None) -> CVResult
    FittedProbe.predict_proba(x) -> (N, C)   # class / label probabilities; values for regression
    FittedProbe.predict(x) -> (N,) class index | (N, C) 0/1 | (N, C) values
    FittedProbe.arrays() / FittedProbe.from_arrays(meta, arrays)   # safetensors-ready
    stratified_folds(strata, k, seed, groups=None) -> (N,) fold index, -1 = always training
    task_strata(task, y) -> (N,) strata

* ``x``: (N, D) or (N, L, D) float (L layers: ``linear`` concatenates the standardised layers,
  ``mlp`` learns softmax weights over them); ``y``: (N,) class index (``multiclass``), (N, C) 0/1
  (``multilabel``), (N,) or (N, C) float (``regression``). ``groups`` (N,) ints: rows of one group
  (the windows or frames of a track) never straddle folds or the validation split.
* ``settings.estimator``: ``auto`` picks ``linear`` below ``settings.linear_max_labels`` groups,
  else ``mlp`` (:meth:`FitSettings.choose`).
* ``linear``: each layer standardised with the training rows' mean and std; multiclass: L2
  logistic regression (lbfgs, multinomial, balanced class weights); multilabel: one such
  binary regression per label, one shared strength; regression: ridge on standardised
  targets (closed form). The strength is chosen by stratified ``folds``-fold cross-validation
  (log loss; mean squared error for ridge) over the grid, on all the rows given — or on
  ``validation`` when given — then the model is refitted on all of them. When there are more
  features than rows the fit runs on the rows' SVD coordinates (exact for an L2 penalty: the
  solution lies in the rows' span), so 13 layers x 1024-d on 200 tracks costs a 200-d fit.
* ``mlp``: :mod:`pipeline.insights.probe_mlp`; early stopping on ``validation`` or, without it,
  on a stratified ``val_fraction`` of the groups, then refitted on all rows for the best epoch
  count.
* A class with one group is kept in the training rows of every fold and split (it cannot be
  scored); :func:`cross_validate` leaves its rows out of ``scored``.

Frame-level use (millions of rows): ``auto`` counts groups (tracks), so pass ``groups`` and
name the estimator: ``FitSettings(estimator="mlp", hidden=0)`` is MARBLE's linear probe trained
by Adam with early stopping on ``validation``; the ``linear`` estimator's lbfgs fits and
cross-validation are meant for up to tens of thousands of rows.

Layer sweep (the evaluation harness, ``pipeline.evaluate.probe``): ``head_layers`` (mlp only)
trains one head per entry in the same pass — a layer index, or -1 for the learned layer
weights — each early-stopped on its own validation loss; ``predict_proba`` then gives
(N, H, C) and ``info["head_epochs"]`` each head's best epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.insights.probe_mlp import mlp_outputs, train_mlp
from pipeline.insights.probe_settings import TASKS, FitSettings

__all__ = [
    "CVResult",
    "FittedProbe",
    "cross_validate",
    "fit_probe",
    "stratified_folds",
    "task_strata",
]

_NEG = -30.0  # logit of a class never seen in training


@dataclass
class FittedProbe:
    """A fitted probe: ``estimator`` ``linear`` (arrays ``mean``, ``std`` (L, D), ``coef`` (C, L*D),
    ``intercept`` (C,), ``y_mean``, ``y_std`` (C,)) or ``mlp`` (the torch state, see
    :mod:`pipeline.insights.probe_mlp`); ``info``: facts for a card (strength, epochs, ...)."""

    task: str
    estimator: str
    state: dict[str, np.ndarray]
    hidden: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS or self.estimator not in ("linear", "mlp"):
            raise ValueError(f"bad probe: task {self.task!r}, estimator {self.estimator!r}")
        need = ("mean", "std", "y_mean", "y_std") + (
            ("coef", "intercept") if self.estimator == "linear" else ()
        )
        if any(k not in self.state for k in need):
            raise ValueError(f"a {self.estimator} probe needs arrays {', '.join(need)}")

    @property
    def n_outputs(self) -> int:
        return int(self.state["y_mean"].shape[0])

    @property
    def layer_weights(self) -> list[float]:
        """mlp: the learned softmax weights; linear: each layer's share of the squared
        coefficients (features standardised, so shares are comparable)."""
        if self.estimator == "mlp":
            return list(self.info.get("layer_weights", []))
        n_layers = self.state["mean"].shape[0]
        sq = np.square(self.state["coef"]).reshape(self.n_outputs, n_layers, -1).sum((0, 2))
        return [float(v) for v in sq / max(float(sq.sum()), 1e-30)]

    def predict_proba(self, x: np.ndarray, batch: int = 8192) -> np.ndarray:
        """(N, C): class probabilities, label probabilities or values (regression)."""
        x = as_layers(x)
        if self.estimator == "mlp":
            return mlp_outputs(self.state, self.task, self.hidden, x, batch)
        out = [self._linear(x[s : s + batch]) for s in range(0, len(x), batch)]
        return np.concatenate(out) if out else np.zeros((0, self.n_outputs), np.float32)

    def _linear(self, x: np.ndarray) -> np.ndarray:
        st = self.state
        z = ((x - st["mean"]) / st["std"]).reshape(len(x), -1)  # (B, L*D)
        logits = z @ st["coef"].T + st["intercept"]  # (B, C)
        return outputs(self.task, logits, st["y_mean"], st["y_std"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        p = self.predict_proba(x)
        if self.task == "multiclass":
            return p.argmax(-1)
        return (p >= 0.5).astype(np.int64) if self.task == "multilabel" else p

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v) for k, v in self.state.items()}

    @classmethod
    def from_arrays(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> FittedProbe:
        """Inverse of :meth:`arrays` with ``meta`` = task, estimator, hidden (and info)."""
        return cls(meta["task"], meta["estimator"], dict(arrays), int(meta.get("hidden", 0)),
                   dict(meta.get("info", {})))  # fmt: skip


def outputs(task: str, logits: np.ndarray, y_mean: np.ndarray, y_std: np.ndarray) -> np.ndarray:
    """Logits (N, C) -> softmax, sigmoid or de-standardised values."""
    if task == "multiclass":
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(np.float32)
    if task == "multilabel":
        return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)
    return (logits * y_std + y_mean).astype(np.float32)


def as_layers(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 1, D); (N, L, D) as is; float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        return x[:, None, :]
    if x.ndim != 3:
        raise ValueError(f"features must be (N, D) or (N, L, D), got shape {x.shape}")
    return x


# --------------------------------------------------------------------------- folds


def task_strata(task: str, y: np.ndarray) -> np.ndarray:
    """Strata for splits: the class; multilabel: each row's rarest positive label (-1: none);
    regression: the quintile of the first target."""
    if task == "multiclass":
        return y.astype(np.int64)
    if task == "multilabel":
        freq = y.sum(0)
        out = np.full(len(y), -1, np.int64)
        for i, row in enumerate(y):
            pos = np.flatnonzero(row > 0.5)
            if len(pos):
                out[i] = pos[np.argmin(freq[pos])]
        return out
    y2 = y.reshape(len(y), -1)
    q = np.quantile(y2[:, 0], [0.2, 0.4, 0.6, 0.8])
    return np.searchsorted(q, y2[:, 0]).astype(np.int64)


def stratified_folds(strata: np.ndarray, k: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold 0..k-1 per row, seeded: the groups of each stratum dealt in turn over the folds (a
    group's rows share its fold); -1 for a stratum with a single group (always training)."""
    rng = np.random.default_rng(seed)
    groups = np.arange(len(strata)) if groups is None else np.asarray(groups)
    uniq, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    g_strata = strata[first]
    g_fold = np.full(len(uniq), -1, np.int64)
    at = int(rng.integers(0, k))
    for s in rng.permutation(np.unique(g_strata)):
        members = rng.permutation(np.flatnonzero(g_strata == s))
        if len(members) < 2:
            continue
        for m in members:
            g_fold[m] = at % k
            at += 1
    return g_fold[inv]


def _folds_for(task: str, y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    n_groups = len(np.unique(groups)) if groups is not None else len(y)
    return stratified_folds(task_strata(task, y), max(2, min(k, n_groups // 2 or 1)), seed, groups)


# --------------------------------------------------------------------------- the linear model


class _Design:
    """Standardised (and, when wider than tall, SVD-reduced) training features of one split."""

    def __init__(self, x: np.ndarray) -> None:  # x (n, L, D)
        self.mean = x.mean(0).astype(np.float32)  # (L, D)
        self.std = (x.std(0) + 1e-6).astype(np.float32)
        z = ((x - self.mean) / self.std).reshape(len(x), -1).astype(np.float64)  # (n, P)
        self.vt: np.ndarray | None = None
        if z.shape[1] > z.shape[0]:
            u, s, vt = np.linalg.svd(z, full_matrices=False)  # z = u s vt, rank <= n
            z, self.vt = u * s, vt  # (n, n) coordinates, (n, P)
        self.z = z

    def full(self, coef: np.ndarray) -> np.ndarray:
        """Coefficients (C, p) in the fit's coordinates -> (C, L*D) on standardised features."""
        return coef if self.vt is None else coef @ self.vt


def _fit_path(
    d: _Design, y: np.ndarray, task: str, n_out: int, grid: tuple[float, ...], s: FitSettings
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(coef (C, p), intercept (C,)) for each strength of ``grid`` (ascending C: warm starts)."""
    if task == "regression":
        return _ridge_path(d.z, y, grid)
    from threadpoolctl import threadpool_limits

    # small fits on one BLAS thread (more only add contention; see probe_mlp.train_threads)
    with threadpool_limits(s.threads or (1 if d.z.size < 4_000_000 else None)):
        return _logistic_paths(d, y, task, n_out, grid, s)


def _logistic_paths(
    d: _Design, y: np.ndarray, task: str, n_out: int, grid: tuple[float, ...], s: FitSettings
) -> list[tuple[np.ndarray, np.ndarray]]:
    cols = [y.astype(np.int64)] if task == "multiclass" else [y[:, j] for j in range(y.shape[1])]
    per_col = [_logistic_path(d.z, c, task, n_out, grid, s) for c in cols]
    if task == "multiclass":
        return per_col[0]
    return [
        (np.concatenate([p[g][0] for p in per_col]), np.concatenate([p[g][1] for p in per_col]))
        for g in range(len(grid))
    ]


def _logistic_path(
    z: np.ndarray, y: np.ndarray, task: str, n_out: int, grid: tuple[float, ...], s: FitSettings
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One L2 logistic regression (multinomial over the classes seen, or one binary label) per C,
    each started from the previous solution; columns of unseen classes get a logit of -30."""
    width = n_out if task == "multiclass" else 1
    yi = y.astype(np.int64) if task == "multiclass" else (y > 0.5).astype(np.int64)
    seen = np.unique(yi)
    if len(seen) < 2:  # one class only: constant prediction
        b = np.full(width, _NEG)
        if task == "multiclass":
            b[int(seen[0])] = 0.0
        else:
            b[0] = -_NEG if seen[0] == 1 else _NEG
        return [(np.zeros((width, z.shape[1])), b)] * len(grid)
    cls = np.searchsorted(seen, yi)  # (n,) index among the seen classes
    counts = np.bincount(cls, minlength=len(seen))
    sw = len(cls) / (len(seen) * counts[cls]) if s.class_weight else np.ones(len(cls))
    theta = np.zeros(len(seen) * (z.shape[1] + 1))
    out = []
    for c in grid:
        theta = _minimise_softmax(z, cls, len(seen), sw, float(c), theta, s.max_iter)
        w = theta[: len(seen) * z.shape[1]].reshape(len(seen), -1)
        b = theta[len(seen) * z.shape[1] :]
        if task == "multilabel":  # logit of the label: class 1 minus class 0
            out.append(((w[1] - w[0])[None, :], np.array([b[1] - b[0]])))
            continue
        full, fb = np.zeros((n_out, z.shape[1])), np.full(n_out, _NEG)
        full[seen], fb[seen] = w, b - b.max()
        out.append((full, fb))
    return out


def _minimise_softmax(
    z: np.ndarray, cls: np.ndarray, k: int, sw: np.ndarray, c: float, theta0: np.ndarray, max_iter: int
) -> np.ndarray:
    """argmin over (W (k, p), b (k,)) of ``c * sum_i sw_i * CE_i + |W|^2 / 2`` (scikit-learn's
    objective of an L2 logistic regression; intercept not penalised), by L-BFGS."""
    from scipy.optimize import minimize

    n, p = z.shape
    onehot = np.zeros((n, k))
    onehot[np.arange(n), cls] = 1.0

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: k * p].reshape(k, p), theta[k * p :]
        logits = z @ w.T + b  # (n, k)
        m = logits.max(1, keepdims=True)
        e = np.exp(logits - m)
        se = e.sum(1, keepdims=True)
        lse = (m + np.log(se))[:, 0]
        loss = c * float(np.sum(sw * (lse - logits[np.arange(n), cls]))) + 0.5 * float(np.sum(w * w))
        g = (e / se - onehot) * (c * sw)[:, None]  # (n, k)
        return loss, np.concatenate([(g.T @ z + w).ravel(), g.sum(0)])

    res = minimize(f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": 1e-5})
    return res.x


def _ridge_path(z: np.ndarray, y: np.ndarray, grid: tuple[float, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ridge on centred features and standardised targets, closed form through the SVD."""
    y2 = y.reshape(len(y), -1).astype(np.float64)
    ys = (y2 - y2.mean(0)) / (y2.std(0) + 1e-6)
    u, sv, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ ys  # (r, C)
    return [((vt.T @ ((sv / (sv**2 + a))[:, None] * uty)).T, np.zeros(y2.shape[1])) for a in grid]


def _loss(task: str, y: np.ndarray, logits: np.ndarray) -> float:
    """Selection loss: log loss (multiclass), mean binary log loss (multilabel), MSE on
    standardised targets (regression, ``y`` already standardised)."""
    if task == "multiclass":
        m = logits.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
        return float(np.mean(lse - logits[np.arange(len(y)), y.astype(np.int64)]))
    if task == "multilabel":
        return float(np.mean(np.logaddexp(0.0, logits) - y * logits))
    return float(np.mean(np.square(logits - y)))


def _y_stats(task: str, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if task != "regression":
        return np.zeros(1), np.ones(1)
    y2 = y.reshape(len(y), -1).astype(np.float64)
    return y2.mean(0), y2.std(0) + 1e-6


def _path_logits(x_tr, y_tr, x_te, task, n_out, grid, s) -> list[np.ndarray]:  # noqa: ANN001
    d = _Design(x_tr)
    z_te = ((x_te - d.mean) / d.std).reshape(len(x_te), -1)
    return [z_te @ d.full(c).T + b for c, b in _fit_path(d, y_tr, task, n_out, grid, s)]


def select_strength(
    x: np.ndarray, y: np.ndarray, task: str, n_out: int, s: FitSettings,
    groups: np.ndarray | None = None, val: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[float, list[float]]:  # fmt: skip
    """The grid's strength with the lowest cross-validated (or validation) loss; (it, losses)."""
    grid = s.alpha_grid if task == "regression" else s.c_grid
    order = np.argsort(grid) if task != "regression" else np.arange(len(grid))
    grid = tuple(float(grid[i]) for i in order)
    losses = np.zeros(len(grid))
    splits = []
    if val is not None:
        splits = [(x, y, val[0], val[1])]
    else:
        fold = _folds_for(task, y, groups, s.folds, s.seed)
        splits = [
            (x[fold != f], y[fold != f], x[fold == f], y[fold == f]) for f in np.unique(fold[fold >= 0])
        ]
    for x_tr, y_tr, x_te, y_te in splits:
        mu, sd = _y_stats(task, y_tr)
        yt = (y_te.reshape(len(y_te), -1) - mu) / sd if task == "regression" else y_te
        for g, logits in enumerate(_path_logits(x_tr, y_tr, x_te, task, n_out, grid, s)):
            losses[g] += _loss(task, yt, logits) * len(y_te)
    # ties go to the stronger regularisation (first C, last alpha)
    best = int(np.argmin(losses)) if task != "regression" else len(grid) - 1 - int(np.argmin(losses[::-1]))
    return grid[best], [float(v) for v in losses / max(1, sum(len(t[3]) for t in splits))]


def fit_linear(
    x: np.ndarray, y: np.ndarray, task: str, n_out: int, strength: float, s: FitSettings
) -> FittedProbe:
    d = _Design(x)
    coef, b = _fit_path(d, y, task, n_out, (strength,), s)[0]
    mu, sd = _y_stats(task, y)
    if task != "regression":
        mu, sd = np.zeros(n_out), np.ones(n_out)
    state = {"mean": d.mean, "std": d.std, "coef": d.full(coef).astype(np.float32),
             "intercept": b.astype(np.float32), "y_mean": mu.astype(np.float32), "y_std": sd.astype(np.float32)}  # fmt: skip
    return FittedProbe(task, "linear", state)


# --------------------------------------------------------------------------- fit and cross-validate


def _prepare(
    x: np.ndarray, y: np.ndarray, task: str, n_outputs: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    x = as_layers(x)
    y = np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"features ({len(x)} rows) and targets ({len(y)} rows) must match and be non-empty")
    if not np.all(np.isfinite(x)) or (y.dtype.kind == "f" and not np.all(np.isfinite(y))):
        raise ValueError("features and targets must be finite")
    if task == "multiclass":
        y = y.astype(np.int64).reshape(-1)
        n = int(y.max()) + 1 if n_outputs is None else int(n_outputs)
        if y.min() < 0 or y.max() >= n:
            raise ValueError(f"class indices must be in [0, {n})")
        return x, y, n
    y = (y.astype(np.float32)).reshape(len(y), -1)
    return x, y, y.shape[1]


def fit_probe(
    x: np.ndarray, y: np.ndarray, task: str, *, groups: np.ndarray | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None, n_outputs: int | None = None,
    settings: FitSettings = FitSettings(), head_layers: tuple[int, ...] | None = None,
) -> FittedProbe:  # fmt: skip
    """Fit the probe of ``settings.estimator`` (``auto``: by the number of groups) on ``x``, ``y``
    (see the module doc); ``validation`` (x, y): the rows for choosing the strength / stopping
    (refitted on both when ``settings.refit``); ``head_layers``: a layer sweep (mlp only)."""
    x, y, n_out = _prepare(x, y, task, n_outputs)
    n_groups = len(np.unique(groups)) if groups is not None else len(y)
    est = settings.choose(n_groups)
    if head_layers is not None and est != "mlp":
        raise ValueError(f"a layer sweep (head_layers) is trained by the mlp estimator, not {est!r}")
    val = None
    if validation is not None:
        xv, yv, _ = _prepare(validation[0], validation[1], task, n_out)
        val = (xv, yv)
    if est == "linear":
        c, losses = select_strength(x, y, task, n_out, settings, groups, val)
        if val is not None and settings.refit:
            x, y = np.concatenate([x, val[0]]), np.concatenate([y, val[1]])
        probe = fit_linear(x, y, task, n_out, c, settings)
        probe.info = {"strength": c, "selection_loss": losses, "groups": n_groups}
        return probe
    if val is not None:
        train, vrows = np.arange(len(x)), np.arange(len(x), len(x) + len(val[0]))
        x, y = np.concatenate([x, val[0]]), np.concatenate([y, val[1]])
    else:
        k = max(2, round(1 / settings.val_fraction))
        fold = _folds_for(task, y, groups, k, settings.seed)
        train, vrows = np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)
    state, info = train_mlp(x, y, task, n_out, train, vrows, settings, head_layers)
    n_val = len(vrows) if groups is None or val is not None else len(np.unique(groups[vrows]))
    info.update(groups=n_groups, val_groups=int(n_val))
    return FittedProbe(task, "mlp", state, settings.hidden, info)


@dataclass
class CVResult:
    """Out-of-fold predictions: ``oof`` (N, C) (rows not ``scored`` hold zeros), ``fold`` (N,)
    (-1: a stratum with one group, training only), ``estimator``, per-fold facts."""

    oof: np.ndarray
    fold: np.ndarray
    estimator: str
    folds: list[dict[str, Any]]

    @property
    def scored(self) -> np.ndarray:
        return self.fold >= 0


def cross_validate(
    x: np.ndarray, y: np.ndarray, task: str, *, groups: np.ndarray | None = None,
    n_outputs: int | None = None, settings: FitSettings = FitSettings(), estimator: str | None = None,
) -> CVResult:  # fmt: skip
    """Stratified ``settings.folds``-fold cross-validation (by group): each fold's probe is fitted
    with :func:`fit_probe` on the other folds (so the linear strength is chosen inside it: nested)
    and predicts the fold's rows."""
    from dataclasses import replace

    x, y, n_out = _prepare(x, y, task, n_outputs)
    n_groups = len(np.unique(groups)) if groups is not None else len(y)
    est = estimator or settings.choose(n_groups)
    s = replace(settings, estimator=est)
    fold = _folds_for(task, y, groups, settings.folds, settings.seed)
    oof = np.zeros((len(y), n_out), np.float32)
    facts = []
    for f in np.unique(fold[fold >= 0]):
        tr, te = fold != f, fold == f
        p = fit_probe(
            x[tr], y[tr], task, groups=None if groups is None else groups[tr], n_outputs=n_out, settings=s
        )
        oof[te] = p.predict_proba(x[te])
        facts.append({"fold": int(f), "rows": int(te.sum()),
                      **{k: p.info[k] for k in ("strength", "epochs") if k in p.info}})  # fmt: skip
    return CVResult(oof, fold, est, facts)
