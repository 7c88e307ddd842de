"""Probes over stored features, every layer at once (MARBLE-style): one head per layer plus one
head on a learned softmax-weighted sum of the layers, all trained in the same pass over the
data (each batch goes through every head), each early-stopped on its own validation loss.

There is one probe trainer in the project, :func:`pipeline.insights.probe_models.fit_probe`
(the one ``jobs/train_probe.py`` uses); this module only maps the evaluation's settings and
outputs onto it: a layer sweep (``head_layers``) of its ``mlp`` estimator (``hidden`` 0 for the
linear probe), no class weights, no refit (each head keeps its best validation epoch).

Inputs are numpy arrays: ``x`` (N, L, D) (N frames or tracks, L layers), targets ``y`` (N,)
class ids (``multiclass``), (N,) floats in [0, 1] (``binary``) or (N, C) multi-hot
(``multilabel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.insights.probe_models import FittedProbe, fit_probe
from pipeline.insights.probe_settings import FitSettings

OUTPUTS = ("binary", "multiclass", "multilabel")


@dataclass(frozen=True)
class ProbeConfig:
    """Probe settings: ``kind`` linear or mlp (one hidden layer), Adam, early stopping."""

    kind: str = "linear"
    hidden: int = 512
    lr: float = 1e-3
    max_epochs: int = 200
    patience: int = 10
    batch_size: int = 1024
    seed: int = 0
    dropout: float = 0.0
    threads: int = 1  # torch threads; more threads spin badly on a busy machine for these small matmuls

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"probe kind must be linear or mlp, got {self.kind!r}")
        if self.hidden < 1 or self.lr <= 0 or self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"invalid probe settings {self}")

    def fit_settings(self) -> FitSettings:
        """The shared trainer's settings for these flags."""
        return FitSettings(estimator="mlp", hidden=0 if self.kind == "linear" else self.hidden,
                           dropout=self.dropout, lr=self.lr, batch_size=self.batch_size,
                           max_epochs=self.max_epochs, patience=self.patience, refit=False,
                           class_weight=False, seed=self.seed, threads=self.threads)  # fmt: skip


@dataclass
class LayerProbes:
    """Trained heads; ``heads[i]`` names head i (``"layer_<ix>"`` or ``"weighted"``)."""

    probe: FittedProbe
    output: str
    heads: list[str]
    epochs: list[int]  # the epoch each head's kept weights come from
    val_loss: list[float]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, L, D) -> (N, H, C) probabilities (softmax for multiclass, sigmoid otherwise)."""
        return self.probe.predict_proba(x)

    @property
    def layer_weights(self) -> list[float]:
        return self.probe.layer_weights


def _targets(output: str, y: np.ndarray) -> np.ndarray:
    return y.astype(np.float32).reshape(len(y), 1) if output == "binary" else y


def fit_layer_probes(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    output: str,
    n_out: int,
    config: ProbeConfig = ProbeConfig(),
    layer_ids: tuple[int, ...] | None = None,
) -> LayerProbes:
    """Train one head per layer and a weighted-layers head on (N, L, D) features in one pass.

    Each head keeps the weights of its best validation loss and stops counting when it has not
    improved for ``patience`` epochs; training ends when every head has stopped."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if x_train.ndim != 3 or x_train.shape[0] == 0 or x_valid.shape[0] == 0:
        raise ValueError(
            f"expected non-empty (N, L, D) train and valid features, got {x_train.shape}, {x_valid.shape}"
        )
    n_layers = x_train.shape[1]
    task = "multiclass" if output == "multiclass" else "multilabel"
    probe = fit_probe(
        x_train, _targets(output, y_train), task, validation=(x_valid, _targets(output, y_valid)),
        n_outputs=n_out if task == "multiclass" else None, settings=config.fit_settings(),
        head_layers=(*range(n_layers), -1),
    )  # fmt: skip
    names = [f"layer_{i}" for i in (layer_ids or range(n_layers))] + ["weighted"]
    val = probe.info["best_val_loss"]
    return LayerProbes(probe, output, names, list(probe.info["head_epochs"]), list(val))
