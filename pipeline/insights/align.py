"""Offset alignment of two tracks' window sequences: is one the other, cropped or shifted?

A copy that starts 3.3 s into its source (a crop), or a source behind a 2 s lead-in, has windows
cut at other boundaries than its source's: with hop = window, each of its windows straddles two
of the source's. :func:`align` therefore compares, for every candidate time offset ``o`` (time
in ``b`` = time in ``a`` + ``o``), each window ``i`` of ``a`` with the windows of ``b`` that
overlap ``[start_i + o, end_i + o]``, weighted by the length of the overlap::

    sim_i(o) = sum_j w_ij(o) * cos(a_i, b_j) / sum_j w_ij(o)     w_ij(o) = |a_i + o  ∩  b_j|

and scores the offset by the mean of ``sim_i(o)`` over the windows of ``a`` that lie inside
``b`` at that offset (each weighted by the share of it inside ``b``). Offsets are tried on a
grid of ``step_s`` (a fraction of the shortest window) over every position where the
overlapping part covers at least ``min_cover`` of the shorter track: a crop lies wholly inside
its source, a source wholly inside a copy with a lead-in. The best offset, its distance
(``1 - score``) and the matched spans in both tracks are returned.

The vector compared with window ``i`` is the overlap-weighted mean of ``b``'s window vectors
(then normalised): MusicFM's window vectors are means over frames, so the mean of two adjacent
windows, weighted by how much of each the shifted window covers, stands for the window cut at
the shifted boundaries (measured on the shared clips: the offset is found within a fraction of
a window, where comparing with the single best-overlapping window lands on window boundaries).

Only the stored window vectors and their ``start_s`` / ``end_s`` are used: no audio, no model.
:func:`align_pairs` reads the windows of a list of track pairs from ``windows.lance`` (a chunk
of pairs at a time) and aligns each pair, the shorter track into the longer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.insights.vectors import StoreRef, id_filter, to_matrix
from pipeline.schemas import layer_column

__all__ = [
    "Alignment",
    "TrackWindows",
    "align",
    "align_pairs",
    "offset_grid",
    "read_windows",
    "windowed_tracks",
]

#: Offsets are tried every ``window / STEP_DIV`` seconds (shortest window of the pair).
STEP_DIV = 8
#: The aligned part must cover at least this share of the shorter track.
MIN_COVER = 0.5
#: A window of ``a`` counts at an offset when at least this share of it lies inside ``b``.
MIN_INSIDE = 0.5


@dataclass(frozen=True)
class TrackWindows:
    """The windows of one track: start and end times (seconds) and unit vectors (n, D)."""

    track_id: str
    starts: np.ndarray  # (n,) float64
    ends: np.ndarray  # (n,) float64
    vectors: np.ndarray  # (n, D) float32, unit rows

    def __post_init__(self) -> None:
        n = len(self.starts)
        if n == 0 or len(self.ends) != n or self.vectors.ndim != 2 or len(self.vectors) != n:
            raise ValueError(f"{self.track_id}: need n >= 1 windows with starts, ends, vectors (n, D)")
        if np.any(self.ends <= self.starts):
            raise ValueError(f"{self.track_id}: every window needs end_s > start_s")

    @property
    def duration(self) -> float:
        return float(self.ends.max() - min(0.0, float(self.starts.min())))

    @property
    def shortest_window(self) -> float:
        return float((self.ends - self.starts).min())


@dataclass(frozen=True)
class Alignment:
    """The best offset of ``a`` in ``b``: ``b`` time = ``a`` time + ``offset_s``; ``distance`` is
    ``1 -`` the offset's score; the spans are the aligned parts (seconds) of each track."""

    offset_s: float
    distance: float
    a_start: float
    a_end: float
    b_start: float
    b_end: float
    windows: int  # windows of ``a`` compared at the offset


def offset_grid(a: TrackWindows, b: TrackWindows, min_cover: float = MIN_COVER) -> np.ndarray:
    """Offsets (seconds) tried for ``a`` in ``b``: every ``window / STEP_DIV`` where the overlap
    of the two tracks covers at least ``min_cover`` of the shorter one."""
    step = min(a.shortest_window, b.shortest_window) / STEP_DIV
    da, db = a.duration, b.duration
    need = min_cover * min(da, db)
    lo, hi = need - da, db - need  # overlap(o) = min(da + o, db) - max(o, 0) >= need
    if hi < lo:
        return np.zeros(0)
    grid = np.arange(np.floor(lo / step), np.ceil(hi / step) + 1) * step
    return grid[(grid >= lo - 1e-9) & (grid <= hi + 1e-9)]


def _scores(
    a: TrackWindows, b: TrackWindows, offsets: np.ndarray, min_cover: float = MIN_COVER
) -> tuple[np.ndarray, np.ndarray]:
    """(score (O,), windows of ``a`` counted (O, na) as their weights) for every offset; -inf
    where the windows counted weigh less than ``min_cover`` of all of ``a``'s."""
    s = a.starts[None, :, None] + offsets[:, None, None]  # (O, na, 1) shifted window starts
    e = a.ends[None, :, None] + offsets[:, None, None]
    w = np.clip(np.minimum(e, b.ends[None, None, :]) - np.maximum(s, b.starts[None, None, :]), 0.0, None)
    interp = np.einsum("onm,md->ond", w.astype(np.float32), b.vectors)  # (O, na, D) overlap-weighted
    interp /= np.maximum(np.linalg.norm(interp, axis=2, keepdims=True), 1e-12)
    av = a.vectors / np.maximum(np.linalg.norm(a.vectors, axis=1, keepdims=True), 1e-12)  # (na, D)
    sim_i = np.einsum("ond,nd->on", interp, av)  # (O, na) cosine to b at the offset
    b_lo, b_hi = float(b.starts.min()), float(b.ends.max())
    inside = np.clip(np.minimum(e[..., 0], b_hi) - np.maximum(s[..., 0], b_lo), 0.0, None)
    share = inside / (a.ends - a.starts)[None, :]  # (O, na) share of window i inside b
    weight = np.where(share >= MIN_INSIDE, share, 0.0)
    score = (weight * sim_i).sum(1) / np.maximum(weight.sum(1), 1e-12)
    score[weight.sum(1) < max(1e-9, min_cover * len(a.starts)) - 1e-9] = -np.inf
    return score, weight


def align(a: TrackWindows, b: TrackWindows, min_cover: float = MIN_COVER) -> Alignment | None:
    """The best alignment of ``a`` in ``b`` (see the module doc), ``None`` when the tracks
    cannot overlap by ``min_cover`` of the shorter one."""
    offsets = offset_grid(a, b, min_cover)
    if not len(offsets):
        return None
    score, weight = _scores(a, b, offsets, min_cover)
    k = int(np.argmax(score))
    if not np.isfinite(score[k]):
        return None
    o, used = float(offsets[k]), weight[k] > 0
    a_start, a_end = float(a.starts[used].min()), float(a.ends[used].max())
    b_lo, b_hi = float(b.starts.min()), float(b.ends.max())
    return Alignment(
        offset_s=o,
        distance=float(max(0.0, 1.0 - score[k])),
        a_start=max(a_start, b_lo - o),
        a_end=min(a_end, b_hi - o),
        b_start=max(a_start + o, b_lo),
        b_end=min(a_end + o, b_hi),
        windows=int(used.sum()),
    )


#: Track pairs aligned per read of ``windows.lance`` (their windows held in memory together).
PAIRS_PER_READ = 4096


def windowed_tracks(ref: StoreRef) -> set[str]:
    """The track ids that have windows in ``ref``'s table (``windows.lance``)."""
    col = ref.open().to_table(columns=["track_id"])["track_id"]
    return set(col.unique().to_pylist())


def read_windows(ref: StoreRef, layer: int, track_ids: Sequence[str]) -> dict[str, TrackWindows]:
    """The windows of ``track_ids`` (those that have any with start and end times), by start."""
    col = layer_column(layer)
    t = ref.open().to_table(
        columns=["track_id", "start_s", "end_s", col], filter=id_filter("track_id", list(track_ids))
    )
    t = t.filter(t["start_s"].is_valid()).filter(t["end_s"].is_valid())
    t = t.sort_by([("track_id", "ascending"), ("start_s", "ascending")])
    tids = t["track_id"].to_numpy(zero_copy_only=False)
    starts, ends = t["start_s"].to_numpy(), t["end_s"].to_numpy()
    vecs = to_matrix(t[col])  # (rows, D)
    cuts = np.flatnonzero(tids[1:] != tids[:-1]) + 1 if len(tids) else np.zeros(0, np.int64)
    out = {}
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(tids)], strict=True):
        if b > a:
            out[str(tids[a])] = TrackWindows(str(tids[a]), starts[a:b], ends[a:b], vecs[a:b])
    return out


def align_pairs(
    ref: StoreRef, layer: int, pairs: Sequence[tuple[str, str]], min_cover: float = MIN_COVER
) -> Iterator[tuple[str, str, Alignment | None]]:
    """``(a, b, alignment of a in b)`` for every pair, ``a`` the shorter track of the two (by
    duration; the smaller id on a tie). A track without windows gives ``None``."""
    for s in range(0, len(pairs), PAIRS_PER_READ):
        chunk = pairs[s : s + PAIRS_PER_READ]
        wins = read_windows(ref, layer, sorted({t for p in chunk for t in p}))
        for x, y in chunk:
            if x not in wins or y not in wins:
                yield x, y, None
                continue
            a, b = sorted((wins[x], wins[y]), key=lambda w: (w.duration, w.track_id))
            yield a.track_id, b.track_id, align(a, b, min_cover)
