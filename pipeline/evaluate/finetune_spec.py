"""What a fine-tuning run is given and what it returns (frozen, validated dataclasses)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LabelledTrack:
    """One training track: its audio URI (local path or object-storage URI) and class index."""

    uri: str
    label: int  # class index of a track-level classification task (e.g. genre)

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"a labelled track needs a non-empty uri, got {self.uri!r}")
        if isinstance(self.label, bool) or not isinstance(self.label, int) or self.label < 0:
            raise ValueError(f"{self.uri}: label must be a class index (int >= 0), got {self.label!r}")


def _positive(name: str, value: Any, kind: type = float) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float) if kind is float else int)
        and math.isfinite(value)
        and value > 0
    )
    if not ok:
        raise ValueError(f"{name} must be a positive {'number' if kind is float else 'int'}, got {value!r}")


@dataclass(frozen=True)
class FinetuneSpec:
    """A fine-tuning run: MusicFM backbone (train mode, ``lr_backbone``) plus a linear head on the
    mean over time of hidden state ``layer`` (``lr_head``), cross-entropy on track labels, one
    example per ``window_s`` window of each track (the track's label).

    ``checkpoint`` is what the embed job's ``--checkpoint`` takes: ``msd``, ``fma``, a path or URI
    of a ``.pt`` (with ``stats``) or ``.safetensors``, or ``random[:SEED]`` (sizes from
    ``model_config``). ``output``: local folder or ``s3://`` prefix for the checkpoints (every
    ``checkpoint_every`` steps, and at the end) and the fine-tuned model. ``batch_size`` is per
    worker. Training stops after ``max_steps`` optimizer steps, or earlier after ``epochs`` passes
    over the data when given. ``cache_decoded``: decode once and keep the windows in Ray's object
    store for later epochs (sets that fit in it), instead of streaming them from the decode stage
    again each epoch."""

    checkpoint: str
    stats: str | None
    model_config: str | None
    train: tuple[LabelledTrack, ...]
    num_classes: int
    output: str
    layer: int = 12
    lr_backbone: float = 1e-5
    lr_head: float = 1e-4
    window_s: float = 10.0
    batch_size: int = 8
    max_steps: int = 1000
    epochs: int | None = None
    checkpoint_every: int = 100
    num_workers: int = 2
    use_gpu: bool = False
    seed: int = 0
    storage_options: dict = field(default_factory=dict)
    # keep the decoded windows in Ray's object store (decoded once, not once per epoch): for
    # training sets that fit in the object store
    cache_decoded: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError("checkpoint must be msd, fma, random[:SEED] or a checkpoint path / URI")
        if not isinstance(self.output, str) or not self.output:
            raise ValueError("output must be a local folder or an object-storage prefix")
        if not isinstance(self.train, tuple) or not self.train:
            raise ValueError("train must be a non-empty tuple of LabelledTrack")
        if any(not isinstance(t, LabelledTrack) for t in self.train):
            raise ValueError("train must hold LabelledTrack items")
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 2
        ):
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        bad = [t for t in self.train if t.label >= self.num_classes]
        if bad:
            raise ValueError(
                f"{bad[0].uri}: label {bad[0].label} is not below num_classes={self.num_classes}"
            )
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")
        for name in ("lr_backbone", "lr_head", "window_s"):
            _positive(name, getattr(self, name))
        if self.window_s < 0.1:
            raise ValueError(f"window_s must be at least 0.1 s, got {self.window_s}")
        for name in ("batch_size", "max_steps", "checkpoint_every", "num_workers"):
            _positive(name, getattr(self, name), int)
        if self.epochs is not None:
            _positive("epochs", self.epochs, int)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.storage_options, dict):
            raise ValueError("storage_options must be a dict")

    def run_key(self) -> str:
        """Fingerprint of what makes two runs the same training (not its length or parallelism):
        a rerun with the same key continues from the latest checkpoint."""
        fields = {
            "checkpoint": self.checkpoint,
            "stats": self.stats,
            "model_config": self.model_config,
            "train": [[t.uri, t.label] for t in self.train],
            "num_classes": self.num_classes,
            "layer": self.layer,
            "lr_backbone": self.lr_backbone,
            "lr_head": self.lr_head,
            "window_s": self.window_s,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }
        return "ft-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FinetuneResult:
    """``checkpoint``: the fine-tuned backbone as a ``.safetensors`` file (config and mel stats
    inside) that ``jobs/embed_catalog.py --checkpoint`` loads, with its own ``model_id``.
    ``losses``: mean training loss over the workers of every step (all runs of a resumed
    training). ``audio_s_per_s_per_worker``: audio seconds through the model per second of the
    training loop, per worker. ``resumed_from``: the step this run started at (0: fresh)."""

    checkpoint: str
    losses: tuple[float, ...]
    steps: int
    audio_s_per_s_per_worker: float
    model_id: str = ""
    base_model_id: str = ""
    resumed_from: int = 0
    head: str = ""  # the linear head (.safetensors: weight, bias; layer and classes in metadata)
