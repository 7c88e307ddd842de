"""Probes on frozen layers (as in MARBLE / the MusicFM paper): label the catalog from a few labels.

:func:`train_probe` joins a labels file (CSV / Parquet / JSON lines with ``track_id`` and label
column(s)) with the stored layer vectors and trains, on CPU or GPU:

* learned softmax weights over the given layers (each layer standardised with the training
  rows' mean and std, then ``sum_l softmax(a)_l * x_l``), then
* a linear layer (``head="linear"``) or one hidden layer of 512 ReLU units with dropout 0.2
  (``head="mlp"``);
* Adam (lr 1e-3), ``ReduceLROnPlateau`` on the validation loss (factor 0.5, patience 5), early
  stopping (patience 10, the best epoch's weights kept; like the plateau schedule, a
  validation loss counts as better when it is at least 1e-4 (relative; 1e-6 absolute at
  least) below the best), at
  most 200 epochs, batches of 256; the features are read once into one float32 (rows, layers,
  dim) tensor and batches are taken from it by index; on CPU, torch threads per
  :func:`train_threads` (1 for small sets or a busy machine: a parked thread stalls every step);
* splits seeded and stratified (by class; multilabel by each row's rarest positive label;
  regression by quintile of the target): 20 % test, 10 % validation, the rest training. At
  window level (``level="window"``) every window of a labelled track is a training row, the
  split is by track, and a track's prediction is the mean of its windows' predictions.

Tasks: ``multiclass`` (one label column, any values), ``multilabel`` (one column of lists, or of
strings joined with ``|``, ``;`` or ``,``; or several 0/1 columns, one per label), ``regression``
(one or more numeric columns; targets standardised for training). Metrics on the held-out test
split (scikit-learn): accuracy and macro-F1; ROC-AUC and average precision (macro over labels
with both classes in the test split); R² (uniform average).

A probe directory holds ``probe.safetensors`` (weights, layer statistics) and ``probe.json``
(the card: name, task, labels, layers, ``model_id``, ``settings_id``, metrics, split sizes,
learned layer weights, settings). :class:`Probe` loads it again (safetensors, no pickle).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.insights.vectors import check_layers, id_filter, store_ref, to_matrix
from pipeline.schemas import layer_column

__all__ = [
    "CARD_FILE",
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

TASKS = ("multiclass", "multilabel", "regression")
HEADS = ("linear", "mlp")
CARD_FILE = "probe.json"
WEIGHTS_FILE = "probe.safetensors"
_SPLIT_CHARS = re.compile(r"\s*[|;,]\s*")


class LabelError(ValueError):
    """A labels file that cannot be used (missing columns, no labelled track in the store...)."""


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe is trained (recorded in its card)."""

    task: str = "multiclass"
    layers: tuple[int, ...] = (7, 12)
    head: str = "mlp"
    hidden: int = 512
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10
    plateau_patience: int = 5
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    level: str = "track"
    seed: int = 0
    min_delta: float = 1e-4  # relative improvement of the validation loss that resets the patience
    threads: int | None = None  # torch CPU threads (None: see train_threads)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be linear or mlp, got {self.head!r}")
        if self.level not in ("track", "window"):
            raise ValueError(f"level must be track or window, got {self.level!r}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct and non-empty, got {self.layers}")
        if not (
            0 < self.val_fraction < 1
            and 0 < self.test_fraction < 1
            and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError("val and test fractions must be in (0, 1) and sum below 1")


# --------------------------------------------------------------------------- labels


def _read_table(path: str) -> pa.Table:
    ext = os.path.splitext(path.lower())[1]
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if ext in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pj

            return pj.read_json(path)
        if ext in (".csv", ".tsv"):
            import pyarrow.csv as pcsv

            opts = pcsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ",")
            return pcsv.read_csv(
                path, parse_options=opts, convert_options=pcsv.ConvertOptions(strings_can_be_null=True)
            )
    except (OSError, pa.ArrowInvalid) as e:
        raise LabelError(f"cannot read labels {path}: {' '.join(str(e).split())}") from None
    raise LabelError(f"labels file {path}: expected .csv, .tsv, .parquet or .jsonl")


@dataclass
class Labels:
    """Targets per track: ``y`` is (N,) class index, (N, C) 0/1 or (N, C) float."""

    track_ids: list[str]
    y: np.ndarray
    labels: list[str]  # class names / label names / target column names
    columns: list[str]


def load_labels(path: str, task: str, columns: Sequence[str] | None = None) -> Labels:
    """Read and check a labels file for ``task`` (rows without a label are dropped)."""
    t = _read_table(path)
    if "track_id" not in t.column_names:
        raise LabelError(f"labels file {path} has no track_id column (columns: {', '.join(t.column_names)})")
    cols = list(columns) if columns else [c for c in t.column_names if c != "track_id"]
    missing = [c for c in cols if c not in t.column_names]
    if missing or not cols:
        raise LabelError(
            f"labels file {path}: no label column {missing or ''} (columns: {', '.join(t.column_names)})"
        )
    ids = [str(x) if x is not None else None for x in t["track_id"].to_pylist()]
    if task == "multiclass":
        if len(cols) != 1:
            raise LabelError(f"multiclass takes one label column, got {cols}; pick one with --label-column")
        vals = t[cols[0]].to_pylist()
        keep = [
            i
            for i, (tid, v) in enumerate(zip(ids, vals, strict=True))
            if tid is not None and v not in (None, "")
        ]
        names = sorted({str(vals[i]) for i in keep})
        if len(names) < 2:
            raise LabelError(f"multiclass needs at least 2 classes in {cols[0]}, got {names}")
        index = {n: i for i, n in enumerate(names)}
        return Labels(
            [ids[i] for i in keep], np.array([index[str(vals[i])] for i in keep], np.int64), names, cols
        )
    if task == "multilabel":
        if len(cols) == 1:
            vals = t[cols[0]].to_pylist()
            sets = []
            for v in vals:
                if v is None:
                    sets.append(None)
                elif isinstance(v, list):
                    sets.append({str(x) for x in v if x not in (None, "")})
                else:
                    sets.append({x for x in _SPLIT_CHARS.split(str(v).strip()) if x})
            keep = [i for i, s in enumerate(sets) if ids[i] is not None and s is not None]
            names = sorted(set().union(*(sets[i] for i in keep))) if keep else []
            y = np.array([[n in sets[i] for n in names] for i in keep], np.float32).reshape(
                len(keep), len(names)
            )
        else:
            mat = np.stack(
                [np.asarray(t[c].to_numpy(zero_copy_only=False), dtype=np.float64) for c in cols], 1
            )
            keep = [i for i in range(len(ids)) if ids[i] is not None and np.all(np.isfinite(mat[i]))]
            names = list(cols)
            y = (mat[keep] > 0.5).astype(np.float32)
        if len(names) < 1:
            raise LabelError("multilabel needs at least one label")
        return Labels([ids[i] for i in keep], y, names, cols)
    mat = []
    for c in cols:
        if not (pa.types.is_integer(t[c].type) or pa.types.is_floating(t[c].type)):
            raise LabelError(f"regression target {c} is not numeric ({t[c].type})")
        mat.append(np.asarray(t[c].to_numpy(zero_copy_only=False), dtype=np.float64))
    m = np.stack(mat, 1)
    keep = [i for i in range(len(ids)) if ids[i] is not None and np.all(np.isfinite(m[i]))]
    return Labels([ids[i] for i in keep], m[keep].astype(np.float32), list(cols), cols)


# --------------------------------------------------------------------------- features


@dataclass
class Features:
    """Layer vectors of the rows to train or predict on."""

    x: np.ndarray  # (N, L, D) float32
    track_ids: list[str]  # (N,) the track of each row (windows share their track's id)
    model_ids: set[str]
    settings_ids: set[str]


def read_features(
    store: str,
    layers: Sequence[int],
    track_ids: Sequence[str] | None = None,
    level: str = "track",
    storage_options: Mapping[str, Any] | None = None,
    scan_min_ids: int = 20_000,
) -> Features:
    """The layer vectors of ``track_ids`` (all tracks when ``None``) at track or window level.
    Up to ``scan_min_ids`` ids are pushed down as a filter; more are joined after a scan."""
    tref = store_ref(store, storage_options)
    ref = tref if level == "track" else store_ref(store, storage_options, "windows")
    ds = ref.open()
    check_layers(ds, layers)
    cols = ["track_id", *[layer_column(i) for i in layers]]
    filt = (
        id_filter("track_id", track_ids) if track_ids is not None and len(track_ids) <= scan_min_ids else None
    )
    tbl = ds.to_table(
        columns=cols + (["model_id", "settings_id"] if level == "track" else ["settings_id"]), filter=filt
    )
    if track_ids is not None and filt is None:
        mask = pc.is_in(tbl["track_id"], value_set=pa.array(list(track_ids), pa.string()))
        tbl = tbl.filter(mask)
    x = _stack_layers(tbl, layers)  # (N, L, D)
    tbl = tbl.drop_columns([layer_column(i) for i in layers])
    if level == "track":
        mids = set(tbl["model_id"].unique().to_pylist())
    else:
        t2 = tref.open().to_table(columns=["model_id"], filter=filt)
        mids = set(t2["model_id"].unique().to_pylist())
    return Features(x, tbl["track_id"].to_pylist(), mids, set(tbl["settings_id"].unique().to_pylist()))


def _stack_layers(tbl: pa.Table, layers: Sequence[int]) -> np.ndarray:
    """The layer columns as one C-contiguous float32 array (N, L, D), filled chunk by chunk (no
    intermediate copy of a whole column)."""
    n = tbl.num_rows
    cols = [tbl[layer_column(i)] for i in layers]
    dim = cols[0].type.list_size
    x = np.empty((n, len(layers), dim), np.float32)
    for j, col in enumerate(cols):
        at = 0
        for chunk in col.chunks:
            x[at : at + len(chunk), j] = to_matrix(chunk)
            at += len(chunk)
    return x


# --------------------------------------------------------------------------- the model


def _net(n_layers: int, dim: int, n_out: int, head: str, hidden: int, dropout: float):
    import torch
    from torch import nn

    class ProbeNet(nn.Module):
        """softmax-weighted sum of standardised layers -> linear or MLP head."""

        def __init__(self) -> None:
            super().__init__()
            self.layer_logits = nn.Parameter(torch.zeros(n_layers))
            self.register_buffer("mean", torch.zeros(n_layers, dim))
            self.register_buffer("std", torch.ones(n_layers, dim))
            self.register_buffer("y_mean", torch.zeros(n_out))
            self.register_buffer("y_std", torch.ones(n_out))
            if head == "linear":
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


def _outputs(task: str, logits: Any, y_mean: Any, y_std: Any) -> np.ndarray:
    import torch

    if task == "multiclass":
        return torch.softmax(logits, dim=1).cpu().numpy()
    if task == "multilabel":
        return torch.sigmoid(logits).cpu().numpy()
    return (logits * y_std + y_mean).cpu().numpy()


class Probe:
    """A trained probe: its card (``probe.json``) and network; :meth:`predict` on layer vectors."""

    def __init__(self, card: dict[str, Any], net: Any) -> None:
        self.card = card
        self.net = net.eval()

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
        """``x`` (N, L, D) -> class probabilities (N, C), label probabilities (N, C) or values (N, C)."""
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(x), batch):
                logits = self.net(torch.from_numpy(np.ascontiguousarray(x[s : s + batch], np.float32)))
                out.append(_outputs(self.task, logits, self.net.y_mean, self.net.y_std))
        n_out = len(self.labels)
        return np.concatenate(out) if out else np.zeros((0, n_out), np.float32)

    def save(self, out_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()}, os.path.join(out_dir, WEIGHTS_FILE)
        )
        with open(os.path.join(out_dir, CARD_FILE), "w") as f:
            json.dump(self.card, f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, probe_dir: str) -> Probe:
        """Load a probe directory (``probe.json`` + ``probe.safetensors``); ValueError when broken."""
        from safetensors.torch import load_file

        card_path = os.path.join(probe_dir, CARD_FILE)
        try:
            with open(card_path) as f:
                card = json.load(f)
            state = load_file(os.path.join(probe_dir, WEIGHTS_FILE))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the probe in {probe_dir}: {' '.join(str(e).split())}") from None
        need = ("task", "layers", "labels", "dim", "head", "model_id", "settings_id", "name")
        if not isinstance(card, dict) or any(k not in card for k in need):
            raise ValueError(f"{card_path} is not a probe card (needs {', '.join(need)})")
        s = card.get("settings", {})
        net = _net(len(card["layers"]), int(card["dim"]), len(card["labels"]), card["head"],
                   int(s.get("hidden", 512)), float(s.get("dropout", 0.2)))  # fmt: skip
        net.load_state_dict(state)
        return cls(card, net)


# --------------------------------------------------------------------------- splits and metrics


def stratified_split(strata: np.ndarray, val: float, test: float, seed: int) -> np.ndarray:
    """0 train / 1 val / 2 test per row: each stratum cut in the same proportions (seeded)."""
    rng = np.random.default_rng(seed)
    part = np.zeros(len(strata), np.int8)
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        n = len(idx)
        n_test = int(math.floor(n * test + 0.5)) if n >= 3 else 0
        n_val = int(math.floor(n * val + 0.5)) if n >= 3 else 0
        if n >= 3 and n_val == 0 and n - n_test >= 3:
            n_val = 1
        part[idx[:n_test]] = 2
        part[idx[n_test : n_test + n_val]] = 1
    # every split non-empty when there are rows to spare
    for want in (2, 1):
        if not np.any(part == want) and np.sum(part == 0) > 2:
            part[rng.choice(np.flatnonzero(part == 0))] = want
    return part


def _strata(task: str, y: np.ndarray) -> np.ndarray:
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
    q = np.quantile(y[:, 0], [0.2, 0.4, 0.6, 0.8])
    return np.searchsorted(q, y[:, 0]).astype(np.int64)


def metrics(task: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Test metrics (see the module doc); ``pred`` as :meth:`Probe.predict` returns it."""
    from sklearn import metrics as skm

    if len(y) == 0:
        return {}
    if task == "multiclass":
        hat = pred.argmax(1)
        return {
            "accuracy": float(skm.accuracy_score(y, hat)),
            "macro_f1": float(
                skm.f1_score(y, hat, average="macro", labels=np.unique(np.concatenate([y, hat])))
            ),
        }
    if task == "multilabel":
        ok = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
        if not ok:
            return {"labels_scored": 0}
        return {
            "roc_auc": float(np.mean([skm.roc_auc_score(y[:, j], pred[:, j]) for j in ok])),
            "average_precision": float(
                np.mean([skm.average_precision_score(y[:, j], pred[:, j]) for j in ok])
            ),
            "labels_scored": len(ok),
        }
    return {"r2": float(skm.r2_score(y, pred))}


# --------------------------------------------------------------------------- training


def _aggregate(task: str, pred: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """Mean of the rows' predictions per track (window level)."""
    out = np.zeros((n, pred.shape[1]), np.float64)
    np.add.at(out, groups, pred)
    cnt = np.bincount(groups, minlength=n)[:, None]
    return (out / np.maximum(cnt, 1)).astype(np.float32)


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
    """Train a probe on the store's vectors for the labels file; save it to ``out_dir``."""
    import torch
    from torch import nn

    t0 = time.perf_counter()
    lab = load_labels(labels_path, settings.task, label_columns)
    feats = read_features(store, settings.layers, sorted(set(lab.track_ids)), settings.level, storage_options)
    if len(feats.model_ids) > 1 or len(feats.settings_ids) > 1:
        raise LabelError(
            f"the labelled tracks were embedded with several models/settings ({sorted(feats.model_ids)}, "
            f"{sorted(feats.settings_ids)}); a probe is trained on one"
        )
    if not feats.track_ids:
        raise LabelError(f"none of the {len(lab.track_ids)} labelled track ids is in the store")
    # tracks that have both a label and vectors, in label order
    present = set(feats.track_ids)
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(lab.track_ids):
        if t in present and t not in seen:
            seen.add(t)
            keep.append(i)
    tids = [lab.track_ids[i] for i in keep]
    y = lab.y[keep]
    tix = {t: i for i, t in enumerate(tids)}
    row_track = np.array([tix[t] for t in feats.track_ids], np.int64)  # (R,) track of each feature row
    split_t = stratified_split(
        _strata(settings.task, y), settings.val_fraction, settings.test_fraction, settings.seed
    )
    split_r = split_t[row_track]

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(settings.seed)
    n_layers, dim = feats.x.shape[1], feats.x.shape[2]
    n_out = len(lab.labels)
    net = _net(n_layers, dim, n_out, settings.head, settings.hidden, settings.dropout)
    tr = split_r == 0
    mean, std = _row_stats(feats.x, np.flatnonzero(tr))
    net.mean.copy_(torch.from_numpy(mean))
    net.std.copy_(torch.from_numpy(std + 1e-6))
    yr = y[row_track]  # (R,) or (R, C)
    if settings.task == "regression":
        net.y_mean.copy_(torch.from_numpy(y[split_t == 0].mean(0)))
        net.y_std.copy_(torch.from_numpy(y[split_t == 0].std(0) + 1e-6))
        target = (yr - y[split_t == 0].mean(0)) / (y[split_t == 0].std(0) + 1e-6)
        loss_fn: nn.Module = nn.MSELoss()
    elif settings.task == "multilabel":
        target, loss_fn = yr, nn.BCEWithLogitsLoss()
    else:
        target, loss_fn = yr, nn.CrossEntropyLoss()
    net = net.to(dev)
    X = torch.from_numpy(np.ascontiguousarray(feats.x)).to(dev)  # (R, L, D)
    Y = torch.from_numpy(np.ascontiguousarray(target)).to(dev)
    tr_idx = torch.from_numpy(np.flatnonzero(tr)).to(dev)
    va_idx = torch.from_numpy(np.flatnonzero(split_r == 1)).to(dev)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    threads = torch.get_num_threads()
    use_threads = train_threads(settings.threads, X.numel()) if dev.type == "cpu" else threads
    torch.set_num_threads(use_threads)
    try:
        t_fit = time.perf_counter()
        best, best_state, epochs = _fit(net, X, Y, tr_idx, va_idx, loss_fn, settings, gen)
        t_fit = time.perf_counter() - t_fit
        if best_state is not None:
            net.load_state_dict(best_state)
        net = net.cpu().eval()
        probe = Probe({}, net)
        probe.card = {"task": settings.task, "labels": lab.labels}  # predict() needs these two
        pred_r = probe.predict(feats.x)
    finally:
        torch.set_num_threads(threads)
    pred_t = _aggregate(settings.task, pred_r, row_track, len(tids))
    yk = y if settings.task != "multiclass" else y.astype(np.int64)
    res = {
        part: metrics(settings.task, yk[split_t == k], pred_t[split_t == k])
        for k, part in enumerate(("train", "val", "test"))
    }
    weights = torch.softmax(net.layer_logits.detach(), 0).numpy()
    probe.card = {
        "format": 1,
        "name": _safe_name(name or (lab.columns[0] if len(lab.columns) == 1 else "tags")),
        "task": settings.task,
        "level": settings.level,
        "labels": lab.labels,
        "label_columns": lab.columns,
        "layers": list(settings.layers),
        "dim": int(dim),
        "head": settings.head,
        "model_id": next(iter(feats.model_ids)),
        "settings_id": next(iter(feats.settings_ids)),
        "metrics": res["test"],
        "metrics_val": res["val"],
        "metrics_train": res["train"],
        "splits": {p: int(np.sum(split_t == k)) for k, p in enumerate(("train", "val", "test"))},
        "rows": {p: int(np.sum(split_r == k)) for k, p in enumerate(("train", "val", "test"))},
        "layer_weights": {str(lay): float(w) for lay, w in zip(settings.layers, weights, strict=True)},
        "epochs": epochs,
        "fit_s": round(t_fit, 3),
        "threads": use_threads,
        "best_val_loss": best,
        "settings": asdict(settings),
        "labels_file": os.path.basename(labels_path),
        "train_s": round(time.perf_counter() - t0, 3),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    if out_dir:
        probe.save(out_dir)
    return probe


def _fit(
    net: Any, X: Any, Y: Any, tr_idx: Any, va_idx: Any, loss_fn: Any, settings: ProbeSettings, gen: Any
) -> tuple[float, Any, int]:
    """Adam + plateau schedule + early stopping; (best validation loss, its weights, epochs run)."""
    import torch

    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=settings.plateau_patience)
    best, best_state, bad, epochs = math.inf, None, 0, 0
    for _epoch in range(settings.max_epochs):
        epochs += 1
        net.train()
        perm = tr_idx[torch.randperm(len(tr_idx), generator=gen).to(X.device)]
        for s in range(0, len(perm), settings.batch_size):
            b = perm[s : s + settings.batch_size]
            opt.zero_grad()
            loss = loss_fn(net(X[b]), Y[b])
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            ix = va_idx if len(va_idx) else tr_idx
            vloss = float(loss_fn(net(X[ix]), Y[ix]))
        sched.step(vloss)
        if best_state is None or vloss < best - max(1e-6, settings.min_delta * abs(best)):
            best, bad = vloss, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= settings.patience:
                break
    return best, best_state, epochs


def _safe_name(name: str) -> str:
    s = re.sub(r"[^a-z0-9_]+", "_", name.strip().lower()).strip("_")
    return s or "probe"
