"""Duplicates verified by window alignment, on real audio: the 12 shared clips plus crops of four
of them (20 %, 35 %, 50 % and 80 % of the source, cut at the start, the end or both sides at
offsets off the window grid), a copy of each behind a 1.3-4.1 s lead-in, and a +6 dB and a
-6 dB copy; embedded through the embed job (small random-weight golden model, 2.5 s windows at a
2.5 s hop: every shifted copy's windows straddle two of its source's; loudness normalised to
-20 dBFS) into a real Lance store, once for the module."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest

from pipeline.insights.align import TrackWindows, align, offset_grid, read_windows
from pipeline.insights.duplicates import Criterion, find_duplicates
from pipeline.insights.vectors import store_ref
from tests.conftest import AUDIO
from tests.insights.conftest import embed, read_catalog, write_catalog
from tools.testkit.crop_audio import Cut, Planted, crop_plan, write_copies

WINDOW_S = 2.5  # hop = window
SOURCES = ["hw_city", "hw_fruit", "lc_city_blues", "fb_mainzik_1p"]
FRACTIONS = (0.2, 0.35, 0.5, 0.8)
LAYER = 1
CLIPS = [r["track_id"] for r in read_catalog()]


@pytest.fixture(scope="module")
def crop_store(ray_cluster, tmp_path_factory) -> tuple[Path, list[Planted]]:
    root = tmp_path_factory.mktemp("crops")
    cat, _ = write_catalog(root / "audio", gain=False, variants=False)
    cuts = crop_plan(SOURCES, FRACTIONS, seed=1) + [
        Cut("hw_snow__plus6db", "hw_snow", gain_db=6.0),
        Cut("lc_lincity__minus6db", "lc_lincity", gain_db=-6.0),
    ]
    rows, planted = write_copies(AUDIO, root / "audio", cuts)
    with open(cat, newline="") as f:
        base = list(csv.DictReader(f))
    with open(cat, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["track_id", "uri", "title", "artist"])
        w.writeheader()
        w.writerows(base + rows)
    embed(cat, root / "store", window_s=WINDOW_S, hop_s=WINDOW_S, loudness_target_db=-20.0)
    return root / "store", planted


def test_every_copy_grouped_with_its_source_and_no_two_clips_grouped(crop_store) -> None:
    store, planted = crop_store
    table, report = find_duplicates(str(store), LAYER, write=False)
    assert report.aligned > 0 and report.align_background > 0
    group = {}
    for r in table.to_pylist():
        group[r["track_id"]] = group[r["match_track_id"]] = r["group_id"]
        assert r["aligned"] is True
    source = {p.copy_id: p.source for p in planted}
    for p in planted:  # crops down to 20 % of the source, lead-ins, +-6 dB
        assert p.copy_id in group and group.get(p.source) == group[p.copy_id], (p, table.to_pylist())
    for a, b in itertools.combinations(CLIPS, 2):  # distinct clips never in one group
        assert a not in group or b not in group or group[a] != group[b], (a, b)
    for r in table.to_pylist():  # every pair is two forms of one clip
        assert source.get(r["track_id"], r["track_id"]) == source.get(
            r["match_track_id"], r["match_track_id"]
        )


def test_pairs_report_the_offset_and_the_spans(crop_store) -> None:
    """A copy paired with its source directly carries the offset (within half a window) and the
    aligned spans: the shorter track's span lies inside it, the other's is the same span moved
    by the offset."""
    store, planted = crop_store
    table, _ = find_duplicates(str(store), LAYER, write=False)
    rows = {frozenset((r["track_id"], r["match_track_id"])): r for r in table.to_pylist()}
    direct = 0
    for p in planted:
        r = rows.get(frozenset((p.copy_id, p.source)))
        if r is None:
            continue  # grouped through another copy
        direct += 1
        want = p.offset_s if r["track_id"] == p.copy_id else -p.offset_s
        assert abs(r["offset_s"] - want) <= WINDOW_S / 2, (p, r)
        assert r["match_start_s"] == pytest.approx(r["start_s"] + r["offset_s"], abs=1e-6)
        assert r["match_end_s"] == pytest.approx(r["end_s"] + r["offset_s"], abs=1e-6)
        assert 0.0 <= r["start_s"] < r["end_s"] and r["windows"] >= 1
    assert direct >= len(planted) // 2


def test_every_copy_aligns_with_its_source_at_its_offset(crop_store) -> None:
    """The alignment itself, copy against source, for every planted copy (also those grouped
    through another copy): offset within half a window, copy nearer its source than any clip."""
    store, planted = crop_store
    ref = store_ref(str(store), None, "windows")
    wins = read_windows(ref, LAYER, CLIPS + [p.copy_id for p in planted])
    for p in planted:
        c, s = wins[p.copy_id], wins[p.source]
        a, b = sorted((c, s), key=lambda w: w.duration)
        al = align(a, b)
        assert al is not None
        want = p.offset_s if a is c else -p.offset_s
        assert abs(al.offset_s - want) <= WINDOW_S / 2, (p, al)
        others = [align(*sorted((c, wins[o]), key=lambda w: w.duration)) for o in CLIPS if o != p.source]
        assert al.distance < min(o.distance for o in others if o is not None), p


def test_track_vectors_alone_miss_copies_that_alignment_finds(crop_store) -> None:
    """The gap test on track vectors (``align="off"``) groups fewer copies than alignment."""
    store, planted = crop_store
    table, report = find_duplicates(str(store), LAYER, criterion=Criterion(align="off"), write=False)
    assert report.aligned == 0
    group = {}
    for r in table.to_pylist():
        group[r["track_id"]] = group[r["match_track_id"]] = r["group_id"]
    found = sum(p.copy_id in group and group.get(p.source) == group[p.copy_id] for p in planted)
    assert found < len(planted)


def _track(tid: str, frames: np.ndarray, start: int, stop: int, win: int, fps: int) -> TrackWindows:
    """Windows of ``win`` frames (hop = window, the last one aligned to the end) of
    ``frames[start:stop]``: each window vector the mean of its frames, like the model's."""
    x = frames[start:stop]
    starts = list(range(0, len(x) - win + 1, win))
    if starts[-1] + win < len(x):
        starts.append(len(x) - win)
    v = np.stack([x[s : s + win].mean(0) for s in starts])
    st = np.array(starts, float) / fps
    return TrackWindows(tid, st, st + win / fps, v.astype(np.float32))


def test_align_finds_a_shifted_crop_between_window_boundaries() -> None:
    """Frames of a smooth random 'song' (10 frames per second); a crop from 13.3 s to 41.7 s of
    a 60 s song, 5 s windows: found at +13.3 s within a step of the grid (window / 8), no other song as near."""
    rng = np.random.default_rng(0)
    frames = np.cumsum(rng.standard_normal((600, 16)), 0).astype(np.float32)  # (frames, D)
    song = _track("song", frames, 0, 600, 50, 10)
    crop = _track("crop", frames, 133, 417, 50, 10)
    al = align(crop, song)
    assert al is not None and abs(al.offset_s - 13.3) <= 5.0 / 8
    assert al.distance < 1e-2 and al.windows == len(crop.starts)  # the grid is 0.625 s off at most
    assert al.a_start == 0.0 and al.a_end == pytest.approx(28.4)
    assert al.b_start == pytest.approx(al.offset_s) and al.b_end == pytest.approx(28.4 + al.offset_s)
    other = _track("other", np.cumsum(rng.standard_normal((300, 16)), 0).astype(np.float32), 0, 300, 50, 10)
    assert align(other, song).distance > 10 * al.distance
    # the grid covers every position where the overlap is at least half the shorter track
    grid = offset_grid(crop, song)
    assert grid.min() <= -crop.duration / 2 + 5.0 / 8 and grid.max() >= 60.0 - crop.duration / 2 - 5.0 / 8
    assert align(crop, song, min_cover=1.0).offset_s == pytest.approx(al.offset_s)


def test_track_windows_are_validated() -> None:
    with pytest.raises(ValueError, match="end_s > start_s"):
        TrackWindows("t", np.array([0.0]), np.array([0.0]), np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="n >= 1"):
        TrackWindows("t", np.zeros(0), np.zeros(0), np.ones((0, 4), np.float32))
    with pytest.raises(ValueError, match="align must be"):
        Criterion(align="maybe")
    with pytest.raises(ValueError, match="align_margin"):
        Criterion(align_margin=1.0)


def test_align_on_needs_windows(tmp_path: Path) -> None:
    from tests.insights.conftest import planted_store

    root, _ = planted_store(tmp_path / "store", n=60, pairs=2, triples=0)
    with pytest.raises(ValueError, match="needs windows.lance with layer 12"):
        find_duplicates(str(root), 12, criterion=Criterion(align="on"), write=False)
    _, report = find_duplicates(str(root), 12, write=False)  # auto: no windows, the gap test
    assert report.aligned == 0
