"""How a probe is fitted: :class:`FitSettings` (shared by the track-level probes of
``jobs/train_probe.py`` and any harness that calls :func:`pipeline.insights.probe_models.fit_probe`).

``LINEAR_MAX_LABELS`` is the size below which ``estimator="auto"`` picks the regularised linear
model and reports a cross-validated estimate (see docs/insights.md, section 2, for the measured
curve behind it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ESTIMATORS", "LINEAR_MAX_LABELS", "TASKS", "FitSettings"]

TASKS = ("multiclass", "multilabel", "regression")
ESTIMATORS = ("auto", "linear", "mlp")
# below this many labelled tracks (groups): the linear model with cross-validated strength, and a
# cross-validated metric; from it on: the MLP with early stopping and a held-out test split
LINEAR_MAX_LABELS = 1000
# regularisation grid of the linear model: inverse strength C of the L2 logistic regression
# (standardised features) and strength alpha of ridge regression
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
ALPHA_GRID = (1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


@dataclass(frozen=True)
class FitSettings:
    """Estimator choice and its hyper-parameters.

    ``estimator``: ``auto`` (linear below ``linear_max_labels`` labelled groups, else mlp),
    ``linear`` (L2 logistic regression / ridge on standardised features, strength chosen by
    ``folds``-fold cross-validation over ``c_grid`` / ``alpha_grid``) or ``mlp`` (MARBLE: learned
    softmax layer weights, then ``hidden`` ReLU units with ``dropout``, or no hidden layer when
    ``hidden`` is 0; Adam, plateau schedule, early stopping on a validation split, then refitted
    on training + validation rows for the chosen number of epochs when ``refit``)."""

    estimator: str = "auto"
    linear_max_labels: int = LINEAR_MAX_LABELS
    folds: int = 5
    c_grid: tuple[float, ...] = C_GRID
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    class_weight: bool = True  # balanced class weights (multiclass, multilabel)
    max_iter: int = 2000  # lbfgs iterations of the logistic regression
    hidden: int = 512
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10
    plateau_patience: int = 5
    min_delta: float = 1e-4  # relative improvement of the validation loss that resets the patience
    val_fraction: float = 0.1  # mlp: share of the groups held out for early stopping
    refit: bool = True
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: pipeline.insights.probe_mlp.train_threads)
    device: str | None = None  # mlp: torch device (None: cuda when available)

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if self.linear_max_labels < 0 or self.hidden < 0 or self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError("linear_max_labels and hidden must be >= 0, max_epochs and batch_size >= 1")
        if not self.c_grid or not self.alpha_grid or min(self.c_grid + self.alpha_grid) <= 0:
            raise ValueError("c_grid and alpha_grid must be non-empty and positive")
        if not 0 < self.val_fraction < 1 or not 0 <= self.dropout < 1:
            raise ValueError("val_fraction must be in (0, 1) and dropout in [0, 1)")

    def choose(self, n_groups: int) -> str:
        """The estimator for ``n_groups`` labelled tracks: ``linear`` or ``mlp``."""
        if self.estimator != "auto":
            return self.estimator
        return "linear" if n_groups < self.linear_max_labels else "mlp"
