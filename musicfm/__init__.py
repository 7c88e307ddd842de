"""MusicFM 25 Hz (BEST-RQ music foundation model) in pure torch, for embedding extraction.

Names are imported lazily so that ``import musicfm.profiles`` (used by command-line parsing)
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "MusicFM25Hz": "model",
    "MusicFMConfig": "config",
    "PROFILES": "profiles",
    "TaskProfile": "profiles",
    "get_profile": "profiles",
    "frame_pool": "pooling",
    "mean_pool": "pooling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'musicfm' has no attribute {name!r}")
