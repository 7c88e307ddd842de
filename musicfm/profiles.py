"""Downstream task profiles of the MusicFM paper (torch-free, so command-line parsing stays fast)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskProfile:
    """Window length and output frame rate of a downstream task (``frames_hz=None``: one vector)."""

    name: str
    window_s: float
    frames_hz: float | None
    n_frames: int

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.n_frames < 1:
            raise ValueError(f"invalid profile {self}")


PROFILES: dict[str, TaskProfile] = {
    p.name: p
    for p in (
        TaskProfile("beat", 6.0, 50.0, 300),
        TaskProfile("chord", 12.0, 16.0, 192),
        TaskProfile("structure", 24.0, 8.0, 192),
        TaskProfile("key", 12.0, 0.5, 6),
        TaskProfile("tagging", 29.1, None, 1),
    )
}


def get_profile(name: str) -> TaskProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None
