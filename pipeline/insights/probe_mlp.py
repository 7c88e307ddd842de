"""The MARBLE probe network (torch): learned softmax weights over standardised layers, then a
linear layer or one hidden ReLU layer with dropout; trained with Adam, ``ReduceLROnPlateau`` on
the validation loss (factor 0.5), early stopping (the best epoch kept), then — when asked —
refitted from scratch on training + validation rows for the best epoch count, replaying the
learning rates of the first run epoch by epoch.

The same trainer serves a layer sweep (``head_layers``): several heads trained together in one
pass over the rows (each batch goes through every head; the heads share only the input), head
``h`` reading hidden state ``head_layers[h]`` or, for ``-1``, the learned softmax-weighted sum of
the layers. Each head keeps its own best epoch; training ends when every head has stopped
improving (no refit). This is how the evaluation harness probes every layer of frame-level and
track-level features at once.

State tensors keep the names of the format-1 probe files (``layer_logits``, ``mean``, ``std``,
``y_mean``, ``y_std``, ``head.*``), so probes saved before still load; a sweep's state has
``head_layers`` (H,) and ``heads.<h>.*`` instead of ``head.*``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.insights.probe_settings import FitSettings

__all__ = ["build_net", "head_losses", "mlp_outputs", "train_mlp", "train_threads"]


def build_net(
    n_layers: int, dim: int, n_out: int, hidden: int, dropout: float, head_layers: Sequence[int] | None = None
) -> Any:
    """softmax-weighted sum of standardised layers -> linear (``hidden`` 0) or MLP head; with
    ``head_layers``, one such head per entry (a layer index, or -1 for the weighted sum)."""
    import torch
    from torch import nn

    def head() -> nn.Module:
        if hidden == 0:
            return nn.Sequential(nn.Linear(dim, n_out))
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))

    if head_layers is not None and any(not -1 <= int(h) < n_layers for h in head_layers):
        raise ValueError(f"head_layers must be in [-1, {n_layers}), got {list(head_layers)}")

    class ProbeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer_logits = nn.Parameter(torch.zeros(n_layers))
            self.register_buffer("mean", torch.zeros(n_layers, dim))
            self.register_buffer("std", torch.ones(n_layers, dim))
            self.register_buffer("y_mean", torch.zeros(n_out))
            self.register_buffer("y_std", torch.ones(n_out))
            self.sweep = [int(h) for h in head_layers] if head_layers is not None else None
            if self.sweep is None:
                self.head = head()
            else:
                self.register_buffer("head_layers", torch.tensor(self.sweep, dtype=torch.int64))
                self.heads = nn.ModuleList([head() for _ in self.sweep])

        @property
        def n_heads(self) -> int:
            return 1 if self.sweep is None else len(self.sweep)

        def head_keys(self, h: int) -> list[str]:
            """State keys trained for head ``h`` (a single head: all of them)."""
            if self.sweep is None:
                return list(self.state_dict())
            own = [k for k in self.state_dict() if k.startswith(f"heads.{h}.")]
            return own + (["layer_logits"] if self.sweep[h] < 0 else [])

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, C) or (B, H, C)
            x = (x - self.mean) / self.std  # (B, L, D)
            w = torch.softmax(self.layer_logits, dim=0)  # (L,)
            h = (w[None, :, None] * x).sum(dim=1)  # (B, D)
            if self.sweep is None:
                return self.head(h)  # (B, C)
            outs = [m(h if i < 0 else x[:, i]) for i, m in zip(self.sweep, self.heads, strict=True)]
            return torch.stack(outs, 1)  # (B, H, C)

    return ProbeNet()


def head_losses(net: Any, loss_fn: Any, out: Any, y: Any) -> Any:
    """(H,) loss of each head of ``net`` on its outputs ``out``."""
    import torch

    if net.sweep is None:
        return loss_fn(out, y)[None]
    return torch.stack([loss_fn(out[:, h], y) for h in range(net.n_heads)])


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


def _new_net(
    x: np.ndarray, y: np.ndarray, task: str, rows: np.ndarray, n_out: int, s: FitSettings,
    head_layers: Sequence[int] | None = None,
) -> Any:  # fmt: skip
    """A seeded net whose layer statistics (and target statistics) are those of ``rows``."""
    import torch

    torch.manual_seed(s.seed)
    net = build_net(x.shape[1], x.shape[2], n_out, s.hidden, s.dropout, head_layers)
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
        head_losses(net, loss_fn, net(X[b]), Y[b]).sum().backward()
        opt.step()


def _val_loss(net: Any, X: Any, Y: Any, rows: Any, loss_fn: Any, batch: int = 65536) -> np.ndarray:
    """(H,) mean loss of each head over ``rows``, in batches (frame-level sets can be large)."""
    import torch

    net.eval()
    total = np.zeros(net.n_heads)
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            b = rows[s : s + batch]
            total += head_losses(net, loss_fn, net(X[b]), Y[b]).double().cpu().numpy() * len(b)
    return total / max(1, len(rows))


def _early_stopped(net: Any, X: Any, Y: Any, tr: Any, va: Any, loss_fn: Any, s: FitSettings) -> dict:
    """Train with early stopping on ``va``, per head: each head's best weights and epoch, and the
    learning rates (the plateau schedule follows the heads' summed validation loss)."""
    import torch

    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=s.plateau_patience)
    gen = torch.Generator().manual_seed(s.seed)
    n = net.n_heads
    best, best_epoch, bad, lrs = np.full(n, math.inf), [0] * n, [0] * n, []
    best_state: dict | None = None
    for epoch in range(1, s.max_epochs + 1):
        lrs.append(opt.param_groups[0]["lr"])
        _epoch(net, opt, X, Y, tr, loss_fn, s.batch_size, gen)
        vloss = _val_loss(net, X, Y, va, loss_fn)
        sched.step(float(vloss.sum()))
        state = net.state_dict()
        if best_state is None:
            best_state = {k: v.detach().clone() for k, v in state.items()}
        for h in range(n):
            if best_epoch[h] == 0 or vloss[h] < best[h] - max(1e-6, s.min_delta * abs(best[h])):
                best[h], best_epoch[h], bad[h] = vloss[h], epoch, 0
                for k in net.head_keys(h):
                    best_state[k] = state[k].detach().clone()
            else:
                bad[h] += 1
        if min(bad) >= s.patience:
            break
    return {"state": best_state, "epochs": max(best_epoch), "head_epochs": best_epoch, "epochs_run": len(lrs),
            "lrs": lrs, "val_loss": float(best[0]) if n == 1 else [float(v) for v in best]}  # fmt: skip


def train_mlp(
    x: np.ndarray, y: np.ndarray, task: str, n_out: int, train: np.ndarray, val: np.ndarray, s: FitSettings,
    head_layers: Sequence[int] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """Fit on rows ``train`` of ``x`` (N, L, D) with early stopping on rows ``val`` (the training
    rows when empty); refit on both for the best epoch count when ``s.refit`` (a single head
    only). ``head_layers``: a layer sweep (see the module doc). Returns the state (numpy arrays)
    and facts for the card (epochs, layer weights, validation loss; per head for a sweep)."""
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
        net = _new_net(x, y, task, train, n_out, s, head_layers).to(dev)
        Y = _targets(task, y, net).to(dev)
        loss_fn = _loss(task, y, train, n_out, s.class_weight).to(dev)
        run = _early_stopped(net, X, Y, rows(train), rows(va_rows), loss_fn, s)
        refit = bool(s.refit and len(val) and head_layers is None)
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
    if head_layers is not None:
        info["head_epochs"] = run["head_epochs"]
    return state, info


def mlp_outputs(
    state: Mapping[str, np.ndarray], task: str, hidden: int, x: np.ndarray, batch: int = 8192
) -> np.ndarray:
    """Probabilities (classes, labels) or values (regression), (N, C) (a sweep: (N, H, C)), of
    ``x`` (N, L, D)."""
    import torch

    n_out = state["y_mean"].shape[0]
    sweep = state.get("head_layers")
    net = build_net(state["mean"].shape[0], state["mean"].shape[1], n_out, hidden, 0.0,
                    None if sweep is None else [int(h) for h in sweep])  # fmt: skip
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    net.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            logits = net(torch.from_numpy(np.ascontiguousarray(x[s : s + batch], np.float32)))
            if task == "multiclass":
                out.append(torch.softmax(logits, dim=-1).numpy())
            elif task == "multilabel":
                out.append(torch.sigmoid(logits).numpy())
            else:
                out.append((logits * net.y_std + net.y_mean).numpy())
    if out:
        return np.concatenate(out)
    return np.zeros((0, n_out) if sweep is None else (0, len(sweep), n_out), np.float32)
