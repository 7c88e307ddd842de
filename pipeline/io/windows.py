"""Window planning: which sample ranges of a decoded track go through the model.

Full windows are laid at the hop; the track end is covered by one last window *aligned to the
end* (overlapping its predecessor) instead of a zero-padded one, so every window holds only
real audio. A track shorter than one window yields a single window of its true length.

Examples (seconds; window 30, hop 30 unless said otherwise)::

    70 s                 -> [0, 30] [30, 60] [40, 70]          (tail aligned to the end)
    60 s                 -> [0, 30] [30, 60]                   (hops already reach the end)
    30 s                 -> [0, 30]                            (exactly one window)
    12 s                 -> [0, 12]                            (one window, true length)
    0.01 s               -> TooShortError                      (below min_s)
    70 s, hop 20         -> [0, 30] [20, 50] [40, 70]          (overlap; end reached, no tail)
    75 s, hop 20         -> [0, 30] [20, 50] [40, 70] [45, 75]
    100 s, window 10, hop 30 -> [0, 10] [30, 40] [60, 70] [90, 100]  (gaps between windows)
    95 s, window 10, hop 30  -> [0, 10] [30, 40] [60, 70] [85, 95]   (tail aligned to the end)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import TooShortError

__all__ = ["WindowSpec", "Window", "plan_windows", "WindowCutter"]


@dataclass(frozen=True)
class WindowSpec:
    """How a track is cut into windows.

    Attributes:
        window_s: window length in seconds (> 0).
        hop_s: distance between window starts in seconds (> 0; < window_s overlaps,
            > window_s leaves gaps).
        min_s: shortest track accepted in seconds (> 0, <= window_s); the default is
            1025 samples at 24 kHz (one centred STFT frame of MusicFM).
        sample_rate: sample rate of the decoded audio (Hz).
    """

    window_s: float = 30.0
    hop_s: float = 30.0
    min_s: float = 1025 / 24000
    sample_rate: int = 24000

    def __post_init__(self) -> None:
        for name in ("window_s", "hop_s", "min_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if (
            isinstance(self.sample_rate, bool)
            or not isinstance(self.sample_rate, int)
            or self.sample_rate <= 0
        ):
            raise ValueError(f"sample_rate must be a positive int, got {self.sample_rate!r}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.hop_s <= 0:
            raise ValueError(f"hop_s must be > 0, got {self.hop_s}")
        if self.min_s <= 0:
            raise ValueError(f"min_s must be > 0, got {self.min_s}")
        if self.min_s > self.window_s:
            raise ValueError(f"min_s ({self.min_s}) must be <= window_s ({self.window_s})")
        if self.window_samples < 1 or self.hop_samples < 1:
            raise ValueError(
                f"window_s={self.window_s} / hop_s={self.hop_s} are under one sample at {self.sample_rate} Hz"
            )

    @property
    def window_samples(self) -> int:
        """Window length in samples, ``round(window_s * sample_rate)``."""
        return int(round(self.window_s * self.sample_rate))

    @property
    def hop_samples(self) -> int:
        """Hop in samples, ``round(hop_s * sample_rate)``."""
        return int(round(self.hop_s * self.sample_rate))

    @property
    def min_samples(self) -> int:
        """Minimum track length in samples, ``max(1, round(min_s * sample_rate))``."""
        return max(1, int(round(self.min_s * self.sample_rate)))


@dataclass(frozen=True)
class Window:
    """One window: samples ``[start, end)`` of the decoded track, numbered ``ix`` from 0."""

    ix: int
    start: int
    end: int

    @property
    def length(self) -> int:
        """Number of samples, ``end - start``."""
        return self.end - self.start

    def start_s(self, sr: int = 24000) -> float:
        """Start time in seconds at sample rate ``sr``."""
        return self.start / sr

    def end_s(self, sr: int = 24000) -> float:
        """End time in seconds at sample rate ``sr``."""
        return self.end / sr


def plan_windows(num_samples: int, spec: WindowSpec) -> list[Window]:
    """Plan the windows of a track of ``num_samples`` samples (at ``spec.sample_rate``).

    Rules:

    * windows of ``W = spec.window_samples`` samples start at ``0, H, 2H, ...``
      (``H = spec.hop_samples``) as long as they fit entirely in the track;
    * if those windows do not reach the end, one last window ``[N - W, N)`` is added, aligned
      to the track end (it overlaps the previous one, nothing is zero-padded);
    * a track with ``N <= W`` gets exactly one window ``[0, N)`` of its true length;
    * ``N < spec.min_samples`` raises :class:`~pipeline.errors.TooShortError`.

    Windows are sorted by start, numbered from 0, and never duplicated.

    >>> [(w.start_s(), w.end_s()) for w in plan_windows(70 * 24000, WindowSpec())]
    [(0.0, 30.0), (30.0, 60.0), (40.0, 70.0)]
    >>> [(w.start_s(), w.end_s()) for w in plan_windows(12 * 24000, WindowSpec())]
    [(0.0, 12.0)]
    >>> [(w.start_s(), w.end_s()) for w in plan_windows(75 * 24000, WindowSpec(hop_s=20))]
    [(0.0, 30.0), (20.0, 50.0), (40.0, 70.0), (45.0, 75.0)]
    """
    if isinstance(num_samples, bool):
        raise TypeError("num_samples must be an int, got bool")
    try:
        n = operator.index(num_samples)  # ints and numpy integers; floats are refused
    except TypeError:
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}") from None
    if n < 0:
        raise ValueError(f"num_samples must be >= 0, got {n}")
    sr = spec.sample_rate
    if n < spec.min_samples:
        raise TooShortError(
            f"audio is {n} samples ({n / sr:.3f} s at {sr} Hz), shorter than the minimum of "
            f"{spec.min_samples} samples ({spec.min_s:.3f} s)"
        )
    w, h = spec.window_samples, spec.hop_samples
    if n <= w:
        return [Window(0, 0, n)]
    count = (n - w) // h + 1  # hop-stepped windows that fit entirely
    windows = [Window(i, i * h, i * h + w) for i in range(count)]
    if windows[-1].end < n:
        windows.append(Window(count, n - w, n))
    return windows


class WindowCutter:
    """Copies windows out of a track that arrives in pieces, keeping only what a later window can
    still need: memory is bounded by one window plus one piece, however long the track.

    ``pieces``: consecutive (n,) float32 arrays of the track (they are kept, not copied: give
    arrays that are not reused). Windows must be asked for by non-decreasing start (the order of
    :func:`plan_windows`); the samples they get are exactly ``track[w.start:w.end]``.
    """

    def __init__(self, pieces: Iterable[np.ndarray]) -> None:
        self._pieces: Iterator[np.ndarray] = iter(pieces)
        self._held: list[tuple[int, np.ndarray]] = []  # (offset in the track, piece), in order
        self._end = 0  # samples received so far
        self._last_start = 0

    def _pull_to(self, end: int) -> None:
        while self._end < end:
            piece = next(self._pieces, None)
            if piece is None:
                raise ValueError(f"the track ended at sample {self._end}, before sample {end}")
            if piece.shape[0]:
                self._held.append((self._end, piece))
                self._end += piece.shape[0]

    def copy_into(self, w: Window, out: np.ndarray) -> None:
        """Write ``track[w.start:w.end]`` into ``out`` ((w.length,) float32), then drop the pieces
        that end before ``w.start``."""
        if w.start < self._last_start:
            raise ValueError(f"windows must come by start: {w.start} after {self._last_start}")
        if out.shape[0] != w.length:
            raise ValueError(f"out holds {out.shape[0]} samples, the window {w.length}")
        self._last_start = w.start
        self._held = [(o, p) for o, p in self._held if o + p.shape[0] > w.start]
        self._pull_to(w.end)
        for o, p in self._held:
            a, b = max(o, w.start), min(o + p.shape[0], w.end)
            if a < b:
                out[a - w.start : b - w.start] = p[a - o : b - o]

    def windows(self, wins: Sequence[Window]) -> Iterator[np.ndarray]:
        """Each window of ``wins`` as a fresh (length,) float32 array, in order."""
        for w in wins:
            out = np.empty(w.length, dtype=np.float32)
            self.copy_into(w, out)
            yield out

    def drain(self) -> int:
        """Read the rest of the pieces (the source checks its own end); the track's length."""
        self._held = []
        for piece in self._pieces:
            self._end += piece.shape[0]
        return self._end
