"""Window planning: table-driven cases, invariants, validation."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import DecodeError, TooShortError
from pipeline.io.windows import Window, WindowSpec, plan_windows

SR = 24000


@pytest.mark.parametrize(
    ("duration_s", "window_s", "hop_s", "expected"),
    [
        # tail aligned to the end, overlapping the previous window
        (70, 30, 30, [(0, 30), (30, 60), (40, 70)]),
        # hop-stepped windows already reach the end: no tail window, no duplicate
        (60, 30, 30, [(0, 30), (30, 60)]),
        (90, 30, 30, [(0, 30), (30, 60), (60, 90)]),
        # exactly one window
        (30, 30, 30, [(0, 30)]),
        # shorter than a window: one window of the true length
        (12, 30, 30, [(0, 12)]),
        (1, 30, 30, [(0, 1)]),
        # a hair over one window: two windows, the second aligned to the end
        (30.5, 30, 30, [(0, 30), (0.5, 30.5)]),
        # hop < window: overlap; the end is reached by the hops
        (70, 30, 20, [(0, 30), (20, 50), (40, 70)]),
        (75, 30, 20, [(0, 30), (20, 50), (40, 70), (45, 75)]),
        (60, 30, 10, [(0, 30), (10, 40), (20, 50), (30, 60)]),
        # hop > window: gaps between windows, tail aligned to the end when needed
        (100, 10, 30, [(0, 10), (30, 40), (60, 70), (90, 100)]),
        (95, 10, 30, [(0, 10), (30, 40), (60, 70), (85, 95)]),
        (75, 10, 30, [(0, 10), (30, 40), (60, 70), (65, 75)]),
        # short windows
        (5, 2, 2, [(0, 2), (2, 4), (3, 5)]),
    ],
)
def test_plan_table(
    duration_s: float, window_s: float, hop_s: float, expected: list[tuple[float, float]]
) -> None:
    n = int(round(duration_s * SR))
    windows = plan_windows(n, WindowSpec(window_s=window_s, hop_s=hop_s))
    assert [(w.start, w.end) for w in windows] == [(round(a * SR), round(b * SR)) for a, b in expected]
    assert [w.ix for w in windows] == list(range(len(windows)))


def test_one_window_exact_samples() -> None:
    spec = WindowSpec()
    assert plan_windows(spec.window_samples, spec) == [Window(0, 0, 720000)]
    assert plan_windows(1025, spec) == [Window(0, 0, 1025)]


def test_tiny_track_raises_too_short() -> None:
    spec = WindowSpec()
    with pytest.raises(TooShortError, match=r"1024 samples .* minimum of 1025"):
        plan_windows(1024, spec)
    with pytest.raises(TooShortError):
        plan_windows(0, spec)
    # TooShortError is a DecodeError, so a stage catching decode failures sees it too
    assert issubclass(TooShortError, DecodeError)


def test_min_s_custom() -> None:
    spec = WindowSpec(window_s=10, hop_s=10, min_s=2.0)
    with pytest.raises(TooShortError):
        plan_windows(2 * SR - 1, spec)
    assert plan_windows(2 * SR, spec) == [Window(0, 0, 2 * SR)]


def test_numpy_int_and_bad_types() -> None:
    spec = WindowSpec()
    assert plan_windows(np.int64(70 * SR), spec)[-1] == Window(2, 40 * SR, 70 * SR)
    with pytest.raises(TypeError):
        plan_windows(70.0 * SR, spec)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        plan_windows(True, spec)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        plan_windows(-5, spec)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_s": 0},
        {"window_s": -1},
        {"hop_s": 0},
        {"hop_s": -30},
        {"min_s": 0},
        {"min_s": 31.0},
        {"window_s": float("nan")},
        {"hop_s": float("inf")},
        {"sample_rate": 0},
        {"window_s": 1e-6, "min_s": 1e-7},  # under one sample
    ],
)
def test_spec_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WindowSpec(**kwargs)


def test_spec_samples() -> None:
    spec = WindowSpec(window_s=30, hop_s=7.5)
    assert spec.window_samples == 720000
    assert spec.hop_samples == 180000
    assert WindowSpec().min_samples == 1025
    assert WindowSpec(sample_rate=16000, window_s=1.0, hop_s=0.5, min_s=0.1).window_samples == 16000


def test_window_times_other_rate() -> None:
    w = Window(ix=1, start=16000, end=48000)
    assert w.start_s(16000) == 1.0 and w.end_s(16000) == 3.0 and w.length == 32000


@pytest.mark.parametrize("window_s,hop_s", [(30, 30), (30, 10), (10, 30), (5, 3), (3, 5), (30, 29.99)])
def test_invariants_random_lengths(window_s: float, hop_s: float) -> None:
    """Coverage, bounds, no duplicates, full windows, sorted; checked on many random lengths."""
    rng = np.random.default_rng(0)
    spec = WindowSpec(window_s=window_s, hop_s=hop_s)
    w_n, h_n = spec.window_samples, spec.hop_samples
    for n in [*rng.integers(spec.min_samples, 400 * SR, size=300), w_n, w_n + 1, w_n - 1, 2 * w_n, w_n + h_n]:
        n = int(n)
        ws = plan_windows(n, spec)
        assert ws[0].start == 0
        assert ws[-1].end == n, "the last window ends at the track end"
        assert len({(w.start, w.end) for w in ws}) == len(ws), "no duplicate windows"
        assert all(a.start < b.start for a, b in zip(ws, ws[1:], strict=False)), "sorted by start"
        assert all(0 <= w.start < w.end <= n for w in ws)
        if n <= w_n:
            assert ws == [Window(0, 0, n)]
            continue
        assert all(w.length == w_n for w in ws), "every window is full length"
        # all but the tail are at the hop; the tail (if any) starts at n - W
        body = ws if ws[-1].start % h_n == 0 and ws[-1].start // h_n == len(ws) - 1 else ws[:-1]
        assert [w.start for w in body] == [i * h_n for i in range(len(body))]
        if body is not ws:
            assert ws[-1].start == n - w_n and body[-1].end < n
        if h_n <= w_n:  # no gaps: every sample is covered
            assert all(b.start <= a.end for a, b in zip(ws, ws[1:], strict=False))


# --------------------------------------------------------------------------- WindowCutter


@pytest.mark.parametrize(
    ("n", "window_s", "hop_s", "piece"),
    [
        (70 * 100, 30, 30, 7),
        (75 * 100, 30, 20, 333),
        (95 * 100, 10, 30, 1000),
        (12 * 100, 30, 30, 50),
        (60 * 100, 30, 30, 6000),
        (101 * 100, 30, 7, 1),
    ],  # fmt: skip
)
def test_window_cutter_gives_the_plan_s_samples_from_pieces(n, window_s, hop_s, piece) -> None:
    import numpy as np

    from pipeline.io.windows import WindowCutter

    spec = WindowSpec(window_s=window_s, hop_s=hop_s, min_s=0.01, sample_rate=100)
    track = np.arange(n, dtype=np.float32)
    wins = plan_windows(n, spec)
    held = []

    def pieces():
        for a in range(0, n, piece):
            held.append(len(cutter._held))
            yield track[a : a + piece].copy()

    cutter = WindowCutter(pieces())
    got = list(cutter.windows(wins))
    assert cutter.drain() == n
    for w, g in zip(wins, got, strict=True):
        assert np.array_equal(g, track[w.start : w.end])
    # what it holds is bounded by one window plus a piece, not by the track
    assert max(held) <= spec.window_samples // piece + 2


def test_window_cutter_refuses_out_of_order_and_short_tracks() -> None:
    import numpy as np

    from pipeline.io.windows import Window, WindowCutter

    cutter = WindowCutter([np.zeros(10, np.float32)])
    cutter.copy_into(Window(0, 5, 8), np.empty(3, np.float32))
    with pytest.raises(ValueError, match="by start"):
        cutter.copy_into(Window(1, 2, 4), np.empty(2, np.float32))
    with pytest.raises(ValueError, match="ended at sample 10"):
        cutter.copy_into(Window(2, 6, 12), np.empty(6, np.float32))
