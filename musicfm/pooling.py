"""Pooling of hidden states and the downstream task profiles of the MusicFM paper.

Hidden states come at 25 Hz (one token per 40 ms). Two poolings:

* :func:`mean_pool` — one vector per sequence: mean over the TIME axis (B, T, D) -> (B, D).
  (The seed snippet averaged the wrong axis; this one reduces T.)
* :func:`frame_pool` — n frames per sequence (B, T, D) -> (B, n, D). For n <= T this is adaptive
  average pooling over time (each output frame averages the tokens whose span it covers). For
  n > T (frame rates above 25 Hz, e.g. beat tracking at 50 Hz) tokens are upsampled by linear
  interpolation at the frame centres (``align_corners=False``), so each 25 Hz token is spread over
  the frames it overlaps and no frame is a copy of padding.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .profiles import PROFILES, TaskProfile, get_profile  # noqa: F401  (re-exported)

TOKEN_RATE_HZ = 25.0


def mean_pool(h: Tensor) -> Tensor:
    """(B, T, D) -> (B, D): average over time."""
    if h.ndim != 3:
        raise ValueError(f"expected (B, T, D), got {tuple(h.shape)}")
    return h.mean(dim=1)


def frame_pool(h: Tensor, n_frames: int) -> Tensor:
    """(B, T, D) -> (B, n_frames, D): adaptive average (n <= T) or linear upsampling (n > T)."""
    if h.ndim != 3:
        raise ValueError(f"expected (B, T, D), got {tuple(h.shape)}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    x = h.transpose(1, 2)  # (B, D, T)
    if n_frames <= h.shape[1]:
        y = F.adaptive_avg_pool1d(x, n_frames)
    else:
        y = F.interpolate(x, size=n_frames, mode="linear", align_corners=False)
    return y.transpose(1, 2)  # (B, n, D)


def num_frames(duration_s: float, frames_hz: float) -> int:
    """Frames for ``duration_s`` seconds at ``frames_hz`` (at least one)."""
    if frames_hz <= 0:
        raise ValueError(f"frames_hz must be > 0, got {frames_hz}")
    return max(1, round(duration_s * frames_hz))
