"""MusicFM 25 Hz (BEST-RQ music foundation model) in pure torch, for embedding extraction."""

from .checkpoint import CheckpointError
from .config import MusicFMConfig
from .model import MusicFM25Hz
from .pooling import PROFILES, TaskProfile, frame_pool, get_profile, mean_pool

__all__ = [
    "CheckpointError",
    "MusicFM25Hz",
    "MusicFMConfig",
    "PROFILES",
    "TaskProfile",
    "frame_pool",
    "get_profile",
    "mean_pool",
]
