"""What a run knows about its model before any work: :class:`ModelInfo`, built by
:func:`describe_model` from one loaded model and the run's embed settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.engine.inference import EmbedSettings

if TYPE_CHECKING:
    from musicfm import MusicFM25Hz, MusicFMConfig


@dataclass(frozen=True)
class ModelInfo:
    """The model's id and sizes, the resolved settings and their fingerprint, the cluster's GPUs."""

    model_id: str
    dim: int
    depth: int
    settings: EmbedSettings
    settings_id: str
    gpus: int
    config: MusicFMConfig | None = field(default=None, compare=False)  # sizes the pools; None: unsized

    def __post_init__(self) -> None:
        bad = [i for i in self.settings.layers if i > self.depth]
        if bad:
            raise ValueError(f"--layers {bad} exceed the model depth {self.depth}")


def describe_model(model: MusicFM25Hz, settings: EmbedSettings, gpus: int) -> ModelInfo:
    """:class:`ModelInfo` of a loaded ``model`` run with ``settings`` on a cluster with ``gpus``
    GPUs (ValueError in one line when a layer exceeds the model's depth)."""
    return ModelInfo(
        model_id=model.model_id,
        dim=model.config.encoder_dim,
        depth=model.config.encoder_depth,
        settings=settings,
        settings_id=settings.settings_id(model.model_id),
        gpus=gpus,
        config=model.config,
    )
