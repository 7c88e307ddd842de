"""Near-duplicate groups: the same recording under several track ids.

For every track (or every window, ``level="window"``) the ``k`` nearest other tracks are found
through the store's cosine ANN index on the layer when it has one, else by an exact blocked
matrix product. Work is split by fragment of the queried table; stores of :data:`RAY_MIN_ROWS`
rows and up run as Ray tasks (the corpus put in Ray's object store once, shared by the tasks).

Search through the index (``ann_mode``; :mod:`pipeline.insights.neighbours`)
    ``batched`` (the default while the vectors fit in ``max_corpus_bytes``, 4 GiB: 1M x 1024-d):
    the index's own IVF partitions (its centroids; every row in the partition of its nearest
    centroid, as Lance assigns them) and the search reader's ``nprobes``
    (:func:`pipeline.search.index.search_params`: 20 of 450 partitions at 200k rows). Each query
    probes its ``nprobes`` nearest partitions, as a Lance IVF query does, but all queries are
    answered together: every partition's rows are scored, in one matrix product, against all
    the queries that probe it, with exact cosine (as Lance's refine step). That is the work of
    ``nprobes`` probes per query and no more, in large matrix products; Lance answers one query
    at a time (also when given a batch of query vectors: ~5 ms per query on the 2-core dev
    machine, 1,000 s per core for 200k tracks). ``lance`` (automatic above
    ``max_corpus_bytes``): one Lance ANN query per row (nothing but ids held in memory).
    Without an index: exact, every row against all (blocks of 512 queries).

Track level, verified by alignment (the default when ``windows.lance`` has the layer)
    The track vectors (and the ANN index) only propose candidates: the ``k`` nearest tracks
    of every track. Each candidate pair is then aligned window by window
    (:mod:`pipeline.insights.align`): the shorter track is slid along the longer one and each
    of its windows compared with the overlap-weighted windows of the other at that offset, so a
    crop (at the start, the end, both sides), a copy behind a lead-in, or the whole shorter
    track inside the longer one is found at one constant offset even when its windows are cut
    at other boundaries. The decision uses the store's own aligned distances ``d`` (1 - mean
    aligned cosine), no absolute level: each track's candidates, sorted by ``d``, match up to
    the largest rank ``m`` (at most half the list) with ``d_m <= align_margin * d_(m+1)``
    (:data:`DEFAULT_ALIGN_MARGIN`, 0.3: a 3x jump; the largest, since copies of one source
    sit at several levels: 1e-4 aligned on the window grid, 3e-3 straddling), and a match must
    also lie below ``align_ceiling`` (0.25) times the median ``d`` of all the run's candidate
    pairs (nearly all distinct near neighbours). Measured on real crops (20-80 %, lead-ins,
    +-6 dB; docs/insights.md): every copy grouped at layer 1 of the random-weight test model,
    no distinct clips merged. The row carries the offset (``offset_s``: time in
    ``match_track_id`` = time in ``track_id`` + offset; ``track_id`` is the shorter track) and
    the aligned spans of both tracks. Pairs where a track has no windows fall back to the gap
    test below, and so does a store of at most ``k`` tracks with windows (each track's list
    would hold every other track, far ones included, and the 3x jump measured there is no
    longer that of the near neighbours: in an 8-track store two distinct clips stood 6x nearer
    each other than the rest); ``align="off"`` (``--align off``) uses the gap test for all pairs.

Gap test on track vectors (stores without windows; calibrated on the store itself)
    Cosine levels differ between checkpoints, layers and random weights (a random-weight model
    puts every pair of tracks above 0.8), so a fixed cut cannot serve all stores. Instead a
    match must stand out from the track's own neighbour distances: with the cosine distances
    ``d_1 <= d_2 <= ... <= d_k`` of the track's neighbours, the first ``m`` neighbours are
    matches where ``m`` is the smallest rank with ``d_m <= margin * d_(m+1)``: the copies are at
    least ``1 / margin`` times nearer than the nearest track that is not a copy. ``margin`` is
    :data:`DEFAULT_MARGIN` (0.1, a 10x gap). At most half of the list can match (``m <= k/2``):
    the other half is the background the matches must stand out from (without this, one far
    outlier at the end of a short list would make every nearer track a "match"); groups larger
    than ``k/2 + 1`` are still found whole through their connections. Measured with the small random-weight test model on
    the shared clips (tests/insights/test_duplicates.py): re-encode, crop, downmix and resample
    variants sit at gap ratios <= 0.02 from their sources, while between distinct clips the
    smallest ratio of the first to the second neighbour is 0.3 or more. ``threshold`` (an
    absolute cosine) replaces the criterion: every neighbour at or above it is a match.

Window level
    Every window queries the windows of the other tracks (best window per track, then the same
    gap test). Two tracks match when at least ``min_windows`` windows of one (or all of its
    windows, if it has fewer) match windows of the other; the row then carries the matching
    spans (first start to last end of the matched windows on each side) and the median offset
    between them: ``A 0-30 s ~ B 60-90 s``.

Groups are the connected components of the matched pairs; ``group_id`` is the smallest
``track_id`` of the group (stable across runs). ``duplicates.lance`` holds one row per matched
pair (both ids, score, spans at window level, the criterion, ``run_id``, ``computed_at``) and is
rewritten by each run. ``incremental=True`` re-queries only tracks embedded after the previous
run (``embedded_at`` newer than its ``computed_at``: the new and changed tracks of a refresh),
drops the previous pairs of those tracks and of tracks gone from the store, and recomputes the
groups.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import StoreNotFoundError, UnknownLayerError
from pipeline.insights.align import MIN_COVER, align_pairs, windowed_tracks
from pipeline.insights.neighbours import ANN_MODES, MAX_CORPUS_BYTES, Neighbours, search_neighbours
from pipeline.insights.vectors import RAY_MIN_ROWS, StoreRef, check_layers, id_filter, store_ref
from pipeline.schemas import DUPLICATES_SCHEMA
from pipeline.store.commits import retry_write

__all__ = [
    "ALIGN_MODES",
    "ANN_MODES",
    "DEFAULT_ALIGN_CEILING",
    "DEFAULT_ALIGN_MARGIN",
    "DEFAULT_K",
    "DEFAULT_MARGIN",
    "MAX_CORPUS_BYTES",
    "Criterion",
    "DuplicateReport",
    "find_duplicates",
    "first_gap",
    "gap_matches",
    "read_duplicates",
]

DEFAULT_MARGIN = 0.1
DEFAULT_ALIGN_MARGIN = 0.3
DEFAULT_ALIGN_CEILING = 0.25
DEFAULT_K = 16
LEVELS = ("track", "window")
#: Track level: ``auto`` verifies candidates by alignment when ``windows.lance`` has the layer,
#: ``on`` requires it, ``off`` decides on track vectors alone (the gap test).
ALIGN_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Criterion:
    """When a candidate is a duplicate: aligned windows (``align``, ``align_margin``,
    ``min_cover``), else the gap test with ``margin``; ``threshold`` (an absolute cosine)
    replaces both the relative tests."""

    margin: float = DEFAULT_MARGIN
    threshold: float | None = None
    k: int = DEFAULT_K
    min_windows: int = 2
    align: str = "auto"
    align_margin: float = DEFAULT_ALIGN_MARGIN
    align_ceiling: float = DEFAULT_ALIGN_CEILING
    min_cover: float = MIN_COVER

    def __post_init__(self) -> None:
        if not 0.0 < self.margin < 1.0:
            raise ValueError(f"margin must be in (0, 1), got {self.margin}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.k < 2 or self.min_windows < 1:
            raise ValueError("k must be >= 2 and min_windows >= 1")
        if self.align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {', '.join(ALIGN_MODES)}, got {self.align!r}")
        for name in ("align_margin", "align_ceiling"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 < self.min_cover <= 1.0:
            raise ValueError(f"min_cover must be in (0, 1], got {self.min_cover}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def gap_matches(sims: np.ndarray, crit: Criterion) -> int:
    """How many of the leading neighbours (``sims``: cosine, best first) are duplicates."""
    if crit.threshold is not None:
        return int(np.sum(sims >= crit.threshold))
    return first_gap(np.maximum(1.0 - sims.astype(np.float64), 0.0), crit.margin)


def first_gap(d: np.ndarray, margin: float, last: bool = False) -> int:
    """How many of the leading distances (``d``, ascending) stand out: the smallest ``m`` (the
    largest with ``last``) with ``d[m-1] <= margin * d[m]``, at most half the list (the rest is
    the background); 0: none."""
    ms = [m for m in range(1, len(d) // 2 + 1) if d[m - 1] <= margin * d[m]]
    return (ms[-1] if last else ms[0]) if ms else 0


def _gap_rows(sims: np.ndarray, crit: Criterion) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gap_matches` for every row of ``sims`` (n, k) at once (-inf pads short rows):
    (nearest / second-nearest distance ratio, nan for rows under 2 neighbours; matches (n,))."""
    n, k = sims.shape
    valid = np.isfinite(sims)
    length = valid.sum(1)
    d = np.where(valid, np.maximum(1.0 - sims.astype(np.float64), 0.0), np.inf)
    ratio = np.full(n, np.nan)
    two = length >= 2
    if k >= 2:
        ratio[two] = d[two, 0] / np.maximum(1e-12, d[two, 1])
    if crit.threshold is not None:
        return ratio, np.sum(valid & (sims >= crit.threshold), axis=1)
    m = np.zeros(n, np.int64)
    for r in range(1, k // 2 + 1):  # at most half of each row's list
        hit = (m == 0) & (r <= length // 2) & (d[:, r - 1] <= crit.margin * d[:, min(r, k - 1)])
        m[hit] = r
    return ratio, m


@dataclass
class DuplicateReport:
    """What :func:`find_duplicates` did."""

    level: str
    layer: int
    criterion: dict[str, Any]
    queried: int = 0
    pairs: int = 0
    groups: int = 0
    tracks_in_groups: int = 0
    exact: bool = True
    method: str = "exact"  # exact | ivf-batched | lance
    partitions: int = 0  # IVF partitions of the index (0: none)
    nprobes: int = 0
    ray: bool = False
    incremental: bool = False
    wall_s: float = 0.0
    search_s: float = 0.0
    run_id: str = ""
    gap_ratio_quantiles: dict[str, float] = field(default_factory=dict)
    aligned: int = 0  # candidate pairs aligned window by window
    align_background: float = float("nan")  # median aligned distance of the candidate pairs
    align_s: float = 0.0

    def summary(self) -> str:
        q = ", ".join(f"{k} {v:.3f}" for k, v in self.gap_ratio_quantiles.items())
        return (
            f"{self.groups} groups ({self.tracks_in_groups} tracks, {self.pairs} pairs) at {self.level} "
            f"level, layer {self.layer}; {self.queried} queried ({self._how()}"
            f"{', Ray' if self.ray else ''}{', incremental' if self.incremental else ''}), "
            f"{self.wall_s:.1f} s; nearest/second-nearest distance ratio quantiles: {q}"
            + (
                f"; {self.aligned} candidate pairs aligned ({self.align_s:.1f} s), median aligned "
                f"distance {self.align_background:.4g}"
                if self.aligned
                else ""
            )
        )

    def _how(self) -> str:
        if self.method == "ivf-batched":
            return f"ANN index: {self.nprobes} of {self.partitions} IVF partitions, batched"
        if self.method == "lance":
            return f"ANN index: Lance queries, nprobes {self.nprobes}"
        return "exact"


# --------------------------------------------------------------------------- the run


def find_duplicates(
    store: str,
    layer: int,
    level: str = "track",
    criterion: Criterion | None = None,
    storage_options: Mapping[str, Any] | None = None,
    incremental: bool = False,
    use_ray: bool | None = None,
    ray_min_rows: int = RAY_MIN_ROWS,
    use_index: bool = True,
    write: bool = True,
    ann_mode: str = "auto",
    max_corpus_bytes: int = MAX_CORPUS_BYTES,
) -> tuple[pa.Table, DuplicateReport]:
    """Find the near-duplicate pairs and groups of a store (see the module doc).

    Returns the pair rows (``DUPLICATES_SCHEMA``) and a report; writes them to
    ``duplicates.lance`` unless ``write=False``.

    Raises:
        StoreNotFoundError, UnknownLayerError (pipeline.search); ValueError for a bad level,
        ``align="on"`` without windows of the layer, or an incremental run without a previous
        run of the same level and layer.
    """
    t0 = time.perf_counter()
    crit = criterion or Criterion()
    if level not in LEVELS:
        raise ValueError(f"level must be track or window, got {level!r}")
    if ann_mode not in ANN_MODES:
        raise ValueError(f"ann_mode must be one of {', '.join(ANN_MODES)}, got {ann_mode!r}")
    tracks_ref = store_ref(store, storage_options)
    ref = tracks_ref if level == "track" else store_ref(store, storage_options, "windows")
    ds = ref.open()
    check_layers(ds, [layer])
    wref = _align_ref(store, storage_options, layer, crit) if level == "track" else None
    report = DuplicateReport(level=level, layer=layer, criterion=asdict(crit), incremental=incremental)
    report.run_id = (
        "dup-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    )
    now = dt.datetime.now(dt.timezone.utc)
    keep_old, query_ids = (
        _incremental_plan(store, storage_options, tracks_ref, level, layer) if incremental else ([], None)
    )
    if use_ray is None:
        use_ray = ds.count_rows() >= ray_min_rows
    report.ray = bool(use_ray)
    fetch = crit.k if level == "track" else crit.k * 4 + 8
    nbrs = search_neighbours(
        ref, layer, crit.k, fetch, id_filter("track_id", query_ids), use_index, ann_mode,
        max_corpus_bytes, bool(use_ray),
    )  # fmt: skip
    report.queried, report.search_s, report.method = len(nbrs.qpos), nbrs.search_s, nbrs.method
    report.exact = nbrs.method == "exact"
    report.partitions, report.nprobes = nbrs.partitions, nbrs.nprobes
    if level == "track":
        rows = _track_level(nbrs, crit, report, wref, layer)
    else:
        rows = _window_level(nbrs, crit, report)
    base = {"level": level, "layer": layer, "criterion": crit.to_json(), "run_id": report.run_id}
    out = _grouped([{**base, "computed_at": now, **r} for r in rows], keep_old, report)
    if write:
        _write(out, _duplicates_ref(ref))
    report.wall_s = time.perf_counter() - t0
    return out, report


def _align_ref(
    store: str, storage_options: Mapping[str, Any] | None, layer: int, crit: Criterion
) -> StoreRef | None:
    """``windows.lance`` when the candidates are to be aligned (``crit.align``), else None."""
    if crit.align == "off":
        return None
    try:
        wref = store_ref(store, storage_options, "windows")
        check_layers(wref.open(), [layer])
        return wref
    except (StoreNotFoundError, UnknownLayerError) as e:  # no windows table, or not this layer
        if crit.align == "on":
            raise ValueError(f"--align on needs windows.lance with layer {layer}: {e}") from None
        return None


def _incremental_plan(
    store: str, storage_options: Mapping[str, Any] | None, tracks_ref: StoreRef, level: str, layer: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """(previous pairs kept, track ids to query): the tracks embedded since the previous run of
    this level and layer are queried again; pairs of those tracks and of gone tracks dropped."""
    old = read_duplicates(store, storage_options)
    if old is None or old.num_rows == 0:
        raise ValueError("--incremental needs a previous run; run find_duplicates once without it")
    old_rows = [r for r in old.to_pylist() if r["level"] == level and r["layer"] == layer]
    if not old_rows:
        raise ValueError(f"--incremental: the previous run was not at {level} level, layer {layer}")
    since = max(r["computed_at"] for r in old_rows)
    t = tracks_ref.open().to_table(columns=["track_id", "embedded_at"])
    live = set(t["track_id"].to_pylist())
    query_ids = [
        tid
        for tid, at in zip(t["track_id"].to_pylist(), t["embedded_at"].to_pylist(), strict=True)
        if at is None or at > since
    ]
    fresh = set(query_ids)
    keep_old = [
        r
        for r in old_rows
        if {r["track_id"], r["match_track_id"]} <= live and not {r["track_id"], r["match_track_id"]} & fresh
    ]
    return keep_old, query_ids


def _quantiles(ratios: np.ndarray) -> dict[str, float]:
    if not len(ratios):
        return {}
    qs = np.quantile(ratios, [0.001, 0.01, 0.5])
    return {"p0.1": float(qs[0]), "p1": float(qs[1]), "p50": float(qs[2])}


def _track_level(
    nbrs: Neighbours, crit: Criterion, report: DuplicateReport, wref: StoreRef | None, layer: int
) -> list[dict[str, Any]]:
    """Pair rows at track level: candidates aligned (``wref``), else the gap test."""
    ratio, ms = _gap_rows(nbrs.sims, crit)
    report.gap_ratio_quantiles = _quantiles(ratio[np.isfinite(ratio)])
    tids = nbrs.ctab["track_id"].to_pylist()
    gap = [
        (tids[nbrs.qpos[i]], tids[nbrs.nb[i, j]], float(nbrs.sims[i, j]))
        for i in np.flatnonzero(ms)
        for j in range(ms[i])
    ]
    if wref is None:
        return _track_pairs(gap)
    have = windowed_tracks(wref)
    if len(have) <= crit.k:  # too few tracks for a background of k candidates: the gap test
        return _track_pairs(gap)
    cands: dict[str, set[str]] = {}  # both directions: a track is a candidate of its candidates
    for i, j in zip(*np.nonzero(nbrs.nb >= 0), strict=True):
        q, c = tids[nbrs.qpos[i]], tids[nbrs.nb[i, j]]
        if q in have and c in have:
            cands.setdefault(q, set()).add(c)
            cands.setdefault(c, set()).add(q)
    rows = _aligned_rows(wref, layer, cands, crit, report)
    done = {frozenset((q, c)) for q, cs in cands.items() for c in cs}
    return rows + _track_pairs([g for g in gap if frozenset(g[:2]) not in done])


def _aligned_rows(
    wref: StoreRef,
    layer: int,
    cands: dict[str, set[str]],
    crit: Criterion,
    report: DuplicateReport,
) -> list[dict[str, Any]]:
    """The candidate pairs whose windows align (see the module doc), with offset and spans.
    ``cands``: each queried track's candidates (tracks with windows)."""
    t0 = time.perf_counter()
    pairs = sorted({tuple(sorted((q, c))) for q, cs in cands.items() for c in cs})
    found = {(a, b): al for a, b, al in align_pairs(wref, layer, pairs, crit.min_cover) if al is not None}
    report.aligned = len(found)
    report.align_s = time.perf_counter() - t0
    if not found:
        return []
    dist = {frozenset(k): al.distance for k, al in found.items()}
    report.align_background = float(np.median(list(dist.values())))
    if crit.threshold is not None:
        keep = {k for k, d in dist.items() if 1.0 - d >= crit.threshold}
    else:
        keep = set()
        for q, cs in cands.items():  # the gap test on each track's aligned distances
            ranked = sorted((dist[k], c) for c in cs if (k := frozenset((q, c))) in dist)
            m = first_gap(np.array([d for d, _ in ranked]), crit.align_margin, last=True)
            keep |= {frozenset((q, c)) for _, c in ranked[:m]}
        ceiling = crit.align_ceiling * report.align_background
        keep = {k for k in keep if dist[k] <= ceiling}  # and well below the store's typical pair
    return [
        {
            "track_id": a,
            "match_track_id": b,
            "score": 1.0 - al.distance,
            "start_s": al.a_start,
            "end_s": al.a_end,
            "match_start_s": al.b_start,
            "match_end_s": al.b_end,
            "offset_s": al.offset_s,
            "windows": al.windows,
            "aligned": True,
        }  # fmt: skip
        for (a, b), al in found.items()
        if frozenset((a, b)) in keep
    ]


def _window_level(nbrs: Neighbours, crit: Criterion, report: DuplicateReport) -> list[dict[str, Any]]:
    """Pair rows at window level: each window's best window per other track, the gap test."""
    accepted: list[tuple[int, int, float]] = []  # (query row, neighbour row, cosine)
    ratios: list[float] = []
    for i in range(len(nbrs.qpos)):
        pos, s = nbrs.nb[i], nbrs.sims[i]
        ok = pos >= 0
        pos, s = pos[ok], s[ok]
        _, first = np.unique(nbrs.codes[pos], return_index=True)  # best window per other track
        first.sort()
        pos, s = pos[first][: crit.k], s[first][: crit.k]
        if len(s) >= 2:
            ratios.append(float((1.0 - s[0]) / max(1e-12, 1.0 - s[1])))
        m = gap_matches(s, crit)
        accepted += [(int(nbrs.qpos[i]), int(pos[j]), float(s[j])) for j in range(m)]
    report.gap_ratio_quantiles = _quantiles(np.asarray(ratios))
    return _window_pairs(accepted, nbrs.ctab, crit)


def _grouped(new_rows: list[dict], keep_old: list[dict], report: DuplicateReport) -> pa.Table:
    """New rows plus the kept previous ones, with their group ids, as a table."""
    have = {(r["track_id"], r["match_track_id"]) for r in new_rows}
    have |= {(b, a) for a, b in have}
    all_rows = new_rows + [r for r in keep_old if (r["track_id"], r["match_track_id"]) not in have]
    comp = _components([(r["track_id"], r["match_track_id"]) for r in all_rows])
    for r in all_rows:
        r["group_id"] = comp[r["track_id"]]
    all_rows.sort(key=lambda r: (r["group_id"], r["track_id"], r["match_track_id"]))
    out = pa.Table.from_pylist(all_rows, schema=DUPLICATES_SCHEMA)
    report.pairs = out.num_rows
    report.groups = len(set(comp.values()))
    report.tracks_in_groups = len(comp)
    return out


def _write(out: pa.Table, dup: StoreRef) -> None:
    # replaces the whole table: a retry after a broken connection writes the same rows again
    store = dup.store()
    retry_write("write of duplicates", lambda: store.write_table(dup.table, out, DUPLICATES_SCHEMA))


def _track_pairs(accepted: list[tuple[str, str, float]]) -> list[dict]:
    """Unordered pairs of matched tracks (best score of both directions)."""
    best: dict[tuple[str, str], float] = {}
    for a, b, s in accepted:
        key = tuple(sorted((a, b)))
        best[key] = max(best.get(key, -2.0), s)  # type: ignore[index]
    return [{"track_id": a, "match_track_id": b, "score": s} for (a, b), s in best.items()]


def _components(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """track_id -> group id (the smallest track_id of its connected component)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def read_duplicates(store: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table | None:
    """``duplicates.lance`` of a store as a table, ``None`` when there is none."""
    ds = _duplicates_ref(store_ref(store, storage_options)).open_or_none()
    return None if ds is None else ds.to_table()


def _duplicates_ref(ref: StoreRef) -> StoreRef:
    """``duplicates.lance`` of the store of ``ref``, unpinned."""
    return StoreRef(ref.root, ref.lance_options, "duplicates")


def _window_pairs(accepted: list[tuple[int, int, float]], ctab: pa.Table, crit: Criterion) -> list[dict]:
    """Track pairs with enough matched windows, with their spans (one row per unordered pair:
    the direction whose side had the most matched windows, i.e. the contained track first)."""
    tids = ctab["track_id"].to_pylist()
    starts = ctab["start_s"].to_numpy(zero_copy_only=False)
    ends = ctab["end_s"].to_numpy(zero_copy_only=False)
    n_win: dict[str, int] = {}
    for t in tids:
        n_win[t] = n_win.get(t, 0) + 1
    by_pair: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
    for a, b, s in accepted:
        by_pair.setdefault((tids[a], tids[b]), []).append((a, b, s))
    cands: dict[tuple[str, str], dict[str, Any]] = {}
    for (ta, tb), ms in by_pair.items():
        qrows = {a for a, _, _ in ms}
        if len(qrows) < min(crit.min_windows, n_win[ta]):
            continue
        a_idx = np.array([a for a, _, _ in ms])
        b_idx = np.array([b for _, b, _ in ms])
        row = {
            "track_id": ta,
            "match_track_id": tb,
            "score": float(np.mean([s for _, _, s in ms])),
            "start_s": float(starts[a_idx].min()),
            "end_s": float(ends[a_idx].max()),
            "match_start_s": float(starts[b_idx].min()),
            "match_end_s": float(ends[b_idx].max()),
            "offset_s": float(np.median(starts[b_idx] - starts[a_idx])),
            "windows": len(qrows),
        }
        key = tuple(sorted((ta, tb)))
        prev = cands.get(key)  # type: ignore[arg-type]
        rank = (len(qrows) / n_win[ta], row["score"])
        if prev is None or rank > prev["_rank"]:
            cands[key] = {**row, "_rank": rank}  # type: ignore[index]
    return [{k: v for k, v in r.items() if k != "_rank"} for r in cands.values()]
