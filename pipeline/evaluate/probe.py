"""Probes over stored features, every layer at once (MARBLE-style): one head per layer plus one
head on a learned softmax-weighted sum of the layers, all trained in the same pass over the
data (each batch goes through every head), each early-stopped on its own validation loss.

Inputs are numpy arrays: ``x`` (N, L, D) (N frames or tracks, L layers), targets ``y`` (N,)
class ids (``multiclass``), (N,) floats in [0, 1] (``binary``) or (N, C) multi-hot
(``multilabel``). The API is small (:class:`ProbeConfig`, :func:`fit_layer_probes`,
:meth:`LayerProbes.predict`) so it can be served by the shared probe trainer of
``pipeline.insights.probes`` once that works over arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

OUTPUTS = ("binary", "multiclass", "multilabel")


@dataclass(frozen=True)
class ProbeConfig:
    """Probe settings: ``kind`` linear or mlp (one hidden layer), Adam, early stopping."""

    kind: str = "linear"
    hidden: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 200
    patience: int = 10
    batch_size: int = 1024
    seed: int = 0
    threads: int = 1  # torch threads; more threads spin badly on a busy machine for these small matmuls

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"probe kind must be linear or mlp, got {self.kind!r}")
        if self.hidden < 1 or self.lr <= 0 or self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"invalid probe settings {self}")


class MultiHead(nn.Module):
    """H = L + 1 independent heads: head l reads layer l, head L a softmax-weighted layer sum."""

    def __init__(self, n_layers: int, dim: int, n_out: int, kind: str, hidden: int) -> None:
        super().__init__()
        h = n_layers + 1
        self.layer_logits = nn.Parameter(torch.zeros(n_layers))
        width = hidden if kind == "mlp" else n_out
        self.w1 = nn.Parameter(torch.randn(h, dim, width) / dim**0.5)
        self.b1 = nn.Parameter(torch.zeros(h, width))
        self.mlp = kind == "mlp"
        if self.mlp:
            self.w2 = nn.Parameter(torch.randn(h, hidden, n_out) / hidden**0.5)
            self.b2 = nn.Parameter(torch.zeros(h, n_out))

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, H, C) logits."""
        w = torch.softmax(self.layer_logits, 0)  # (L,)
        mixed = torch.einsum("bld,l->bd", x, w)[:, None]  # (B, 1, D)
        z = torch.cat([x, mixed], dim=1)  # (B, H, D)
        z = torch.einsum("bhd,hdk->bhk", z, self.w1) + self.b1
        if self.mlp:
            z = torch.einsum("bhk,hkc->bhc", torch.relu(z), self.w2) + self.b2
        return z

    def head_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n != "layer_logits"]


@dataclass
class LayerProbes:
    """Trained heads; ``heads[i]`` names head i (``"layer_<ix>"`` or ``"weighted"``)."""

    model: MultiHead
    mean: np.ndarray  # (L, D) feature standardisation from the training set
    std: np.ndarray  # (L, D)
    output: str
    heads: list[str]
    epochs: list[int]  # the epoch each head's kept weights come from
    val_loss: list[float]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, L, D) -> (N, H, C) probabilities (softmax for multiclass, sigmoid otherwise)."""
        self.model.eval()
        with torch.no_grad():
            z = self.model(torch.from_numpy(((x - self.mean) / self.std).astype(np.float32)))
        z = torch.softmax(z, -1) if self.output == "multiclass" else torch.sigmoid(z)
        return z.numpy()

    @property
    def layer_weights(self) -> list[float]:
        return torch.softmax(self.model.layer_logits.detach(), 0).tolist()


def _loss(output: str, logits: Tensor, y: Tensor) -> Tensor:
    """Per-head loss (H,) of (B, H, C) logits."""
    if output == "multiclass":
        b, h, c = logits.shape
        ce = nn.functional.cross_entropy(logits.reshape(b * h, c), y.repeat_interleave(h), reduction="none")
        return ce.reshape(b, h).mean(0)
    target = y[:, None, None].expand_as(logits) if output == "binary" else y[:, None, :].expand_as(logits)
    return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(0, 2))


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
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    n_layers, dim = x_train.shape[1:]
    mean = x_train.mean(0)
    std = x_train.std(0) + 1e-6
    xt = torch.from_numpy(((x_train - mean) / std).astype(np.float32))
    xv = torch.from_numpy(((x_valid - mean) / std).astype(np.float32))
    cast = torch.long if output == "multiclass" else torch.float32
    yt, yv = torch.as_tensor(y_train, dtype=cast), torch.as_tensor(y_valid, dtype=cast)
    model = MultiHead(n_layers, dim, 1 if output == "binary" else n_out, config.kind, config.hidden)
    if output == "binary":
        yt, yv = yt.reshape(-1), yv.reshape(-1)
    opt = torch.optim.AdamW(
        [{"params": model.head_params(), "weight_decay": config.weight_decay},
         {"params": [model.layer_logits], "weight_decay": 0.0}], lr=config.lr)  # fmt: skip
    n_heads = n_layers + 1
    best = [float("inf")] * n_heads
    best_epoch, stale = [0] * n_heads, [0] * n_heads
    kept = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(config.seed)
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(config.batch_size):
            opt.zero_grad()
            _loss(output, _squeeze(model(xt[idx]), output), yt[idx]).sum().backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = _loss(output, _squeeze(model(xv), output), yv).tolist()
        state = model.state_dict()
        for h in range(n_heads):
            if val[h] < best[h] - 1e-6:
                best[h], best_epoch[h], stale[h] = val[h], epoch, 0
                for k in ("w1", "b1", "w2", "b2"):
                    if k in state:
                        kept[k][h] = state[k][h]
                if h == n_heads - 1:
                    kept["layer_logits"] = state["layer_logits"].clone()
            else:
                stale[h] += 1
        if min(stale) >= config.patience:
            break
    model.load_state_dict(kept)
    names = [f"layer_{i}" for i in (layer_ids or range(n_layers))] + ["weighted"]
    return LayerProbes(model, mean, std, output, names, best_epoch, best)


def _squeeze(logits: Tensor, output: str) -> Tensor:
    return logits[..., 0][..., None] if output == "binary" else logits
