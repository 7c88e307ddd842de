"""The MARBLE probe network (torch): learned softmax weights over standardised layers, then a
linear layer or one hidden ReLU layer with dropout; trained with Adam, ``ReduceLROnPlateau`` on
the validation loss (factor 0.5), early stopping (the best epoch kept), then — when asked —
refitted from scratch on training + validation rows for the best epoch count, replaying the
learning rates of the first run epoch by epoch.

State tensors keep the names of the format-1 probe files (``layer_logits``, ``mean``, ``std``,
``y_mean``, ``y_std``, ``head.*``), so probes saved before still load.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.insights.probe_settings import FitSettings

__all__ = ["build_net", "mlp_outputs", "train_mlp", "train_threads"]


def build_net(n_layers: int, dim: int, n_out: int, hidden: int, dropout: float) -> Any:
    """softmax-weighted sum of standardised layers -> linear (``hidden`` 0) or MLP head."""
    import torch
    from torch import nn

    class ProbeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer_logits = nn.Parameter(torch.zeros(n_layers))
            self.register_buffer("mean", torch.zeros(n_layers, dim))
            self.register_buffer("std", torch.ones(n_layers, dim))
            self.register_buffer("y_mean", torch.zeros(n_out))
            self.register_buffer("y_std", torch.ones(n_out))
            if hidden == 0:
                self.head = nn.Sequential(nn.Linear(dim, n_out))
            else:
                self.head = nn.Sequential(
                    nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, C)
            x = (x - self.mean) / self.std  # (B, L, D)
            w = torch.softmax(self.layer_logits, dim=0)  # (L,)
            h = (w[None, :, None] * x).sum(dim=1)  # (B, D)
            return self.head(h)  # (B, C)

    return ProbeNet()


def train_threads(threads: int | None, numel: int) -> int:
    """Torch CPU threads for training: ``threads`` when given; 1 for small feature sets (tiny
    steps: more threads only add contention); else torch's default capped at the cores the
    other processes leave free (cores minus the 1-minute load average, at least 1). A thread
    that the scheduler parks stalls every step of the others (measured on the 2-core dev machine
    with a second process busy: 45 s per epoch with 2 threads against 3.8 s with 1, 100k rows
    x 2 layers x 1024-d, MLP, batches of 256)."""
    import torch

    if threads:
        return int(threads)
    if numel < 4_000_000:
        return 1
    cpus = os.cpu_count() or 1
    try:
        free = cpus - os.getloadavg()[0]
    except OSError:
        free = cpus
    return max(1, min(torch.get_num_threads(), int(free + 0.5)))


def _row_stats(x: np.ndarray, rows: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over ``x[rows]`` (axis 0), in float64, chunk by chunk."""
    s1 = np.zeros(x.shape[1:], np.float64)
    s2 = np.zeros(x.shape[1:], np.float64)
    for s in range(0, len(rows), chunk):
        b = x[rows[s : s + chunk]].astype(np.float64)
        s1 += b.sum(0)
        s2 += np.square(b).sum(0)
    n = max(1, len(rows))
    mean = s1 / n
    return mean.astype(np.float32), np.sqrt(np.maximum(s2 / n - mean**2, 0.0)).astype(np.float32)


def _loss(task: str, y: np.ndarray, rows: np.ndarray, n_out: int, balanced: bool) -> Any:
    from torch import nn

    if task == "regression":
        return nn.MSELoss()
    if task == "multilabel":
        return nn.BCEWithLogitsLoss()
    import torch

    counts = np.bincount(y[rows].astype(np.int64), minlength=n_out).astype(np.float64)
    if not balanced:
        return nn.CrossEntropyLoss()
    w = np.where(counts > 0, len(rows) / (np.count_nonzero(counts) * np.maximum(counts, 1)), 1.0)
    return nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32))


def _new_net(x: np.ndarray, y: np.ndarray, task: str, rows: np.ndarray, n_out: int, s: FitSettings) -> Any:
    """A seeded net whose layer statistics (and target statistics) are those of ``rows``."""
    import torch

    torch.manual_seed(s.seed)
    net = build_net(x.shape[1], x.shape[2], n_out, s.hidden, s.dropout)
    mean, std = _row_stats(x, rows)
    net.mean.copy_(torch.from_numpy(mean))
    net.std.copy_(torch.from_numpy(std + 1e-6))
    if task == "regression":
        net.y_mean.copy_(torch.from_numpy(y[rows].mean(0).astype(np.float32)))
        net.y_std.copy_(torch.from_numpy((y[rows].std(0) + 1e-6).astype(np.float32)))
    return net


def _targets(task: str, y: np.ndarray, net: Any) -> Any:
    import torch

    if task == "multiclass":
        return torch.from_numpy(y.astype(np.int64))
    t = torch.from_numpy(np.ascontiguousarray(y, np.float32))
    return (t - net.y_mean) / net.y_std if task == "regression" else t


def _epoch(net: Any, opt: Any, X: Any, Y: Any, rows: Any, loss_fn: Any, batch: int, gen: Any) -> None:
    import torch

    net.train()
    perm = rows[torch.randperm(len(rows), generator=gen).to(rows.device)]
    for s in range(0, len(perm), batch):
        b = perm[s : s + batch]
        opt.zero_grad()
        loss_fn(net(X[b]), Y[b]).backward()
        opt.step()


def _val_loss(net: Any, X: Any, Y: Any, rows: Any, loss_fn: Any, batch: int = 65536) -> float:
    """Mean loss over ``rows``, in batches (frame-level validation sets can be large)."""
    import torch

    net.eval()
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            b = rows[s : s + batch]
            total += float(loss_fn(net(X[b]), Y[b])) * len(b)
    return total / max(1, len(rows))


def _early_stopped(net: Any, X: Any, Y: Any, tr: Any, va: Any, loss_fn: Any, s: FitSettings) -> dict:
    """Train with early stopping on ``va``: best weights, best epoch count, learning rates."""
    import torch

    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=s.plateau_patience)
    gen = torch.Generator().manual_seed(s.seed)
    best, best_state, best_epoch, bad, lrs = math.inf, None, 0, 0, []
    for epoch in range(1, s.max_epochs + 1):
        lrs.append(opt.param_groups[0]["lr"])
        _epoch(net, opt, X, Y, tr, loss_fn, s.batch_size, gen)
        vloss = _val_loss(net, X, Y, va, loss_fn)
        sched.step(vloss)
        if best_state is None or vloss < best - max(1e-6, s.min_delta * abs(best)):
            best, best_epoch, bad = vloss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= s.patience:
                break
    return {"state": best_state, "epochs": best_epoch, "epochs_run": len(lrs), "lrs": lrs, "val_loss": best}


def train_mlp(
    x: np.ndarray, y: np.ndarray, task: str, n_out: int, train: np.ndarray, val: np.ndarray, s: FitSettings
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit on rows ``train`` of ``x`` (N, L, D) with early stopping on rows ``val`` (the training
    rows when empty); refit on both for the best epoch count when ``s.refit``. Returns the state
    (numpy arrays) and facts for the card (epochs, layer weights, validation loss)."""
    import torch

    dev = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    used = train_threads(s.threads, x.size) if dev.type == "cpu" else threads
    torch.set_num_threads(used)
    try:
        X = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(dev)  # (N, L, D)

        def rows(ix: np.ndarray) -> Any:
            return torch.from_numpy(ix).to(dev)

        va_rows = val if len(val) else train
        net = _new_net(x, y, task, train, n_out, s).to(dev)
        Y = _targets(task, y, net).to(dev)
        loss_fn = _loss(task, y, train, n_out, s.class_weight).to(dev)
        run = _early_stopped(net, X, Y, rows(train), rows(va_rows), loss_fn, s)
        refit = bool(s.refit and len(val))
        if refit:  # from scratch on train + val, for the chosen epochs at the same learning rates
            both = np.sort(np.concatenate([train, val]))
            net = _new_net(x, y, task, both, n_out, s).to(dev)
            Y = _targets(task, y, net).to(dev)
            loss_fn = _loss(task, y, both, n_out, s.class_weight).to(dev)
            opt = torch.optim.Adam(net.parameters(), lr=s.lr)
            gen = torch.Generator().manual_seed(s.seed)
            for lr in run["lrs"][: run["epochs"]]:
                for g in opt.param_groups:
                    g["lr"] = lr
                _epoch(net, opt, X, Y, rows(both), loss_fn, s.batch_size, gen)
        else:
            net.load_state_dict(run["state"])
        net = net.cpu()
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    weights = torch.softmax(net.layer_logits.detach(), 0).numpy()
    info = {
        "epochs": run["epochs"], "epochs_run": run["epochs_run"], "best_val_loss": run["val_loss"],
        "refit": refit, "layer_weights": [float(w) for w in weights], "threads": used,
    }  # fmt: skip
    return state, info


def mlp_outputs(
    state: Mapping[str, np.ndarray], task: str, hidden: int, x: np.ndarray, batch: int = 8192
) -> np.ndarray:
    """Probabilities (classes, labels) or values (regression), (N, C), of ``x`` (N, L, D)."""
    import torch

    n_out = state["y_mean"].shape[0]
    net = build_net(state["mean"].shape[0], state["mean"].shape[1], n_out, hidden, 0.0)
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    net.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            logits = net(torch.from_numpy(np.ascontiguousarray(x[s : s + batch], np.float32)))
            if task == "multiclass":
                out.append(torch.softmax(logits, dim=1).numpy())
            elif task == "multilabel":
                out.append(torch.sigmoid(logits).numpy())
            else:
                out.append((logits * net.y_std + net.y_mean).numpy())
    return np.concatenate(out) if out else np.zeros((0, n_out), np.float32)
