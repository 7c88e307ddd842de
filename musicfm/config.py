"""MusicFM configuration: a frozen dataclass, readable from the neutral JSON format of ``shared/golden``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


def _ceil_half(n: int) -> int:
    """Output length of a 3-tap, stride-2, pad-1 conv: ceil(n / 2)."""
    return (n + 1) // 2


@dataclass(frozen=True)
class MusicFMConfig:
    """Sizes and numerics of a MusicFM 25 Hz model. Defaults are the released full-size model."""

    encoder_dim: int = 1024  # D, width of the Conformer
    encoder_depth: int = 12  # number of Conformer layers (hidden_states has depth + 1 entries)
    conv_dim: int = 512  # channels of the two residual conv blocks
    num_heads: int = 16  # attention heads (head_dim = encoder_dim // num_heads)
    ffn_dim: int = 4096  # both macaron feed-forwards
    n_mels: int = 128
    n_fft: int = 2048
    hop_length: int = 240  # 100 mel frames per second at 24 kHz
    sample_rate: int = 24000
    rotary_base: float = 10000.0
    conv_kernel: int = 31  # depthwise conv of the Conformer convolution module
    layer_norm_eps: float = 1e-5
    batch_norm_eps: float = 1e-5
    stats_keys: tuple[str, str] = ("melspec_2048_mean", "melspec_2048_std")
    # Shapes of parameters that are in the released checkpoints but unused for embeddings.
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    codebook_size: int = 4096
    codebook_dim: int = 16
    num_codebooks: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive = (
            "encoder_dim",
            "encoder_depth",
            "conv_dim",
            "num_heads",
            "ffn_dim",
            "n_mels",
            "n_fft",
            "hop_length",
            "sample_rate",
            "conv_kernel",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MusicFMConfig.{name} must be a positive int, got {value!r}")
        if self.encoder_dim % self.num_heads:
            raise ValueError(f"encoder_dim {self.encoder_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (same padding), got {self.conv_kernel}")
        if not (self.rotary_base > 0 and self.layer_norm_eps > 0 and self.batch_norm_eps > 0):
            raise ValueError("rotary_base, layer_norm_eps and batch_norm_eps must be positive")
        if len(self.stats_keys) != 2 or not all(isinstance(k, str) for k in self.stats_keys):
            raise ValueError(f"stats_keys must be two strings (mean key, std key), got {self.stats_keys!r}")
        object.__setattr__(self, "stats_keys", tuple(self.stats_keys))

    @property
    def head_dim(self) -> int:
        return self.encoder_dim // self.num_heads

    @property
    def mel_bins_after_conv(self) -> int:
        """Frequency bins left after the two stride-2 blocks (128 -> 64 -> 32)."""
        return _ceil_half(_ceil_half(self.n_mels))

    @property
    def min_samples(self) -> int:
        """Shortest input: centred STFT reflect-pads n_fft // 2 samples, which needs a longer signal."""
        return self.n_fft // 2 + 1

    @property
    def samples_per_token(self) -> int:
        return self.hop_length * 4

    @property
    def token_rate_hz(self) -> float:
        return self.sample_rate / self.samples_per_token

    def num_tokens(self, num_samples: int) -> int:
        """T = ceil((N // hop) / 4): tokens produced for ``num_samples`` of audio."""
        t_mel = num_samples // self.hop_length
        return _ceil_half(_ceil_half(t_mel))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["stats_keys"] = list(self.stats_keys)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MusicFMConfig:
        """Build from a dict; missing keys take defaults, unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown MusicFMConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        kwargs = dict(data)
        if "stats_keys" in kwargs:
            kwargs["stats_keys"] = tuple(kwargs["stats_keys"])
        if "rotary_base" in kwargs:
            kwargs["rotary_base"] = float(kwargs["rotary_base"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> MusicFMConfig:
        """Read the neutral JSON format (see ``shared/golden/config.json``)."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(data)
