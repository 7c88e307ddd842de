from __future__ import annotations

import pytest
import torch

from musicfm import PROFILES, frame_pool, get_profile, mean_pool
from musicfm.pooling import num_frames


def test_mean_pool_reduces_time_axis() -> None:
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # (B, T, D)
    out = mean_pool(h)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[0], h[0].mean(0))


def test_frame_pool_downsamples_by_averaging() -> None:
    h = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1).repeat(1, 1, 2)
    out = frame_pool(h, 4)
    assert out.shape == (1, 4, 2)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))


def test_frame_pool_upsamples_linearly_for_rates_above_25hz() -> None:
    h = torch.tensor([[[0.0], [2.0]]])  # 2 tokens
    out = frame_pool(h, 4)[0, :, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 1.5, 2.0]))
    beat = get_profile("beat")
    h = torch.randn(1, 150, 4)  # 6 s at 25 Hz
    assert frame_pool(h, num_frames(beat.window_s, beat.frames_hz)).shape == (1, 300, 4)


def test_profiles_match_the_paper() -> None:
    got = {k: (p.window_s, p.frames_hz, p.n_frames) for k, p in PROFILES.items()}
    assert got == {
        "beat": (6.0, 50.0, 300),
        "chord": (12.0, 16.0, 192),
        "structure": (24.0, 8.0, 192),
        "key": (12.0, 0.5, 6),
        "tagging": (29.1, None, 1),
    }
    for p in PROFILES.values():
        if p.frames_hz:
            assert num_frames(p.window_s, p.frames_hz) == p.n_frames
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("tempo")
