"""Near-duplicate groups: the same recording under several track ids.

For every track (or every window, ``level="window"``) the ``k`` nearest other tracks are found
through the store's cosine ANN index on the layer when it has one, else by an exact blocked
matrix product. Work is split by fragment of the queried table; stores of :data:`RAY_MIN_ROWS`
rows and up run as Ray tasks (the corpus put in Ray's object store once, shared by the tasks).

Search through the index (``ann_mode``)
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

Default criterion (calibrated on the store itself, no absolute cosine level)
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

from pipeline.insights.vectors import (
    RAY_MIN_ROWS,
    StoreRef,
    check_layers,
    fragment_groups,
    id_filter,
    read_fragments,
    run_tasks,
    store_ref,
    to_matrix,
    unit_rows,
)
from pipeline.schemas import DUPLICATES_SCHEMA, layer_column

__all__ = [
    "ANN_MODES",
    "DEFAULT_K",
    "DEFAULT_MARGIN",
    "MAX_CORPUS_BYTES",
    "Criterion",
    "DuplicateReport",
    "find_duplicates",
    "gap_matches",
    "read_duplicates",
]

DEFAULT_MARGIN = 0.1
DEFAULT_K = 16
LEVELS = ("track", "window")
#: How an indexed layer is searched: ``batched`` (the index's IVF partitions, each scored at
#: once against all the queries that probe it), ``lance`` (one Lance ANN query per row),
#: ``auto`` (batched unless the corpus vectors exceed ``max_corpus_bytes``).
ANN_MODES = ("auto", "batched", "lance")
#: ``ann_mode="auto"`` holds the corpus vectors (float32) up to this size: 1M x 1024-d.
MAX_CORPUS_BYTES = 4 << 30
_BLOCK = 512  # query rows per matrix product (exact search)
_QUERY_CHUNK = 16_384  # queries searched together (batched IVF search)
_SCORES = 8_000_000  # most entries of one score matrix (batched IVF search)


@dataclass(frozen=True)
class Criterion:
    """When a neighbour is a duplicate: the gap test with ``margin`` (default) or ``threshold``."""

    margin: float = DEFAULT_MARGIN
    threshold: float | None = None
    k: int = DEFAULT_K
    min_windows: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.margin < 1.0:
            raise ValueError(f"margin must be in (0, 1), got {self.margin}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.k < 2 or self.min_windows < 1:
            raise ValueError("k must be >= 2 and min_windows >= 1")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def gap_matches(sims: np.ndarray, crit: Criterion) -> int:
    """How many of the leading neighbours (``sims``: cosine, best first) are duplicates."""
    if crit.threshold is not None:
        return int(np.sum(sims >= crit.threshold))
    d = np.maximum(1.0 - sims.astype(np.float64), 0.0)
    for m in range(1, len(d) // 2 + 1):  # at most half the list: the rest is the background
        if d[m - 1] <= crit.margin * d[m]:
            return m
    return 0


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

    def summary(self) -> str:
        q = ", ".join(f"{k} {v:.3f}" for k, v in self.gap_ratio_quantiles.items())
        return (
            f"{self.groups} groups ({self.tracks_in_groups} tracks, {self.pairs} pairs) at {self.level} "
            f"level, layer {self.layer}; {self.queried} queried ({self._how()}"
            f"{', Ray' if self.ray else ''}{', incremental' if self.incremental else ''}), "
            f"{self.wall_s:.1f} s; nearest/second-nearest distance ratio quantiles: {q}"
        )

    def _how(self) -> str:
        if self.method == "ivf-batched":
            return f"ANN index: {self.nprobes} of {self.partitions} IVF partitions, batched"
        if self.method == "lance":
            return f"ANN index: Lance queries, nprobes {self.nprobes}"
        return "exact"


# --------------------------------------------------------------------------- neighbour search


@dataclass(frozen=True)
class _Corpus:
    """The searched rows. Positions are ranks by ``_rowid``; the vectors are held in partition
    order: partition ``p`` is ``vectors[ptr[p]:ptr[p + 1]]``, the rows at positions
    ``members[ptr[p]:ptr[p + 1]]``. Exact search is one partition holding every row."""

    rowids: np.ndarray  # (N,) uint64, sorted
    codes: np.ndarray  # (N,) int64 track code of each row (by position)
    vectors: np.ndarray | None  # (N, D) unit rows in partition order; None: Lance's own search
    members: np.ndarray | None = None  # (N,) position of each row of ``vectors``
    ptr: np.ndarray | None = None  # (P + 1,) partition boundaries in ``vectors``
    centroids: np.ndarray | None = None  # (P, D) unit IVF centroids; None: exact (P = 1)
    nprobes: int = 1


def _ivf_index(ds: Any, column: str, k: int) -> tuple[dict[str, Any], np.ndarray] | None:
    """(Lance query parameters, IVF centroids (P, D)) of the layer's cosine IVF index, if any."""
    from pipeline.search.index import search_params

    for desc in ds.describe_indices():
        if list(desc.field_names) == [column] and str(desc.index_type).upper().startswith("IVF"):
            details = desc.details if isinstance(desc.details, dict) else {}
            if str(details.get("metric_type", "cosine")).lower() not in ("cosine", ""):
                return None
            centroids = to_matrix(ds.get_ivf_model(desc.name).centroids)
            sp = search_params(str(desc.index_type), len(centroids), k)
            out: dict[str, Any] = {"nprobes": sp.nprobes, "refine_factor": sp.refine_factor}
            if sp.ef:
                out["ef"] = max(sp.ef, k)
            return out, centroids
    return None


def _nearest_centroids(x: np.ndarray, centroids: np.ndarray, n: int) -> np.ndarray:
    """(N, n) indexes of the ``n`` nearest centroids (cosine) of each row, nearest first."""
    out = np.empty((len(x), n), np.int64)
    if n >= len(centroids):
        for s in range(0, len(x), 8192):
            sc = x[s : s + 8192] @ centroids.T
            out[s : s + 8192] = np.argsort(-sc, axis=1, kind="stable")[:, :n]
        return out
    for s in range(0, len(x), 8192):
        sc = x[s : s + 8192] @ centroids.T  # (b, P)
        top = np.argpartition(-sc, n - 1, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(sc, top, axis=1), axis=1, kind="stable")
        out[s : s + 8192] = np.take_along_axis(top, order, axis=1)
    return out


def _partitioned(
    raw: np.ndarray, order: np.ndarray, centroids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(members, ptr): the positions (rank by row id; ``raw[order[pos]]`` is the row at ``pos``)
    of each partition's rows, every row in the partition of its nearest centroid (Lance's IVF
    assignment), or one partition without centroids."""
    n = len(order)
    if centroids is None:
        return np.arange(n, dtype=np.int64), np.array([0, n], np.int64)
    part_t = np.concatenate(  # partition of each row in table order, block by block
        [_nearest_centroids(unit_rows(raw[s : s + 65536]), centroids, 1)[:, 0] for s in range(0, len(raw), 65536)]
    ) if len(raw) else np.zeros(0, np.int64)  # fmt: skip
    part = part_t[order]  # by position
    members = np.argsort(part, kind="stable")
    ptr = np.searchsorted(part[members], np.arange(len(centroids) + 1)).astype(np.int64)
    return members, ptr


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns of each row of ``scores``, best first: (indexes, values)."""
    import torch

    vals, idx = torch.topk(torch.from_numpy(scores), k, dim=1, largest=True, sorted=True)
    return idx.numpy(), vals.numpy()


def _exact_block(
    qv: np.ndarray, own: np.ndarray, corpus: _Corpus, fetch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbours of the queries ``qv`` (b, D) among all rows, rows of the query's own
    track (``own`` codes) left out: positions (b, fetch) with -1 padding, cosine (b, fetch)."""
    assert corpus.vectors is not None and corpus.members is not None
    b = len(qv)
    nb = np.full((b, fetch), -1, np.int64)
    sims = np.full((b, fetch), -np.inf, np.float32)
    kk = min(fetch, len(corpus.members))
    if kk == 0:
        return nb, sims
    sc = qv @ corpus.vectors.T  # (b, N)
    sc[corpus.codes[corpus.members][None, :] == own[:, None]] = -np.inf
    top, ts = _top(sc, kk)
    nb[:, :kk] = corpus.members[top]
    sims[:, :kk] = ts
    return nb, sims


def _ivf_search(
    qv: np.ndarray, own: np.ndarray, corpus: _Corpus, fetch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of the queries ``qv`` (n, D) within their ``corpus.nprobes`` nearest IVF
    partitions, exact cosine (as Lance's IVF search with full refinement). Batched by
    partition: every partition's rows are scored against all the queries that probe it in
    one matrix product (the work of ``nprobes`` probes per query, no more), each probe keeps
    its best ``fetch``, then the best ``fetch`` of a query's probes are kept."""
    assert corpus.centroids is not None and corpus.ptr is not None and corpus.members is not None
    assert corpus.vectors is not None
    n, npr = len(qv), corpus.nprobes
    probes = _nearest_centroids(qv, corpus.centroids, npr)  # (n, npr)
    cand = np.full((n, npr * fetch), -1, np.int64)
    cand_s = np.full((n, npr * fetch), -np.inf, np.float32)
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    cuts = np.flatnonzero(np.diff(flat[order])) + 1
    for grp in np.split(order, cuts):
        if not len(grp):
            continue
        p = int(flat[grp[0]])
        a, e = int(corpus.ptr[p]), int(corpus.ptr[p + 1])
        if e <= a:
            continue
        vec, pos = corpus.vectors[a:e], corpus.members[a:e]
        codes = corpus.codes[pos]
        kk = min(fetch, e - a)
        step = max(1, _SCORES // (e - a))  # bounds the score matrix
        for s in range(0, len(grp), step):
            g = grp[s : s + step]
            qi, slot = g // npr, g % npr
            sc = qv[qi] @ vec.T  # (m, |p|)
            sc[codes[None, :] == own[qi][:, None]] = -np.inf
            top, ts = _top(sc, kk)
            cols = slot[:, None] * fetch + np.arange(kk)[None, :]
            cand[qi[:, None], cols] = pos[top]
            cand_s[qi[:, None], cols] = ts
    top, ts = _top(cand_s, min(fetch, cand_s.shape[1]))
    nb = np.full((n, fetch), -1, np.int64)
    sims = np.full((n, fetch), -np.inf, np.float32)
    nb[:, : top.shape[1]] = np.take_along_axis(cand, top, axis=1)
    sims[:, : top.shape[1]] = ts
    return nb, sims


def _neighbour_task(
    fragment_ids: Sequence[int],
    ref: StoreRef,
    layer: int,
    fetch: int,
    query_filter: str | None,
    corpus: _Corpus,
    ann: dict[str, Any] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours of the rows of some fragments: (query positions (n,), neighbour positions
    (n, fetch) with -1 padding, cosine (n, fetch)); rows of the query's own track are left out.

    With corpus vectors (exact, or batched IVF): the queries are grouped by their nearest
    partition and each block of up to ``_BLOCK`` queries is scored, in one matrix product,
    against every row of the union of its queries' ``nprobes`` nearest partitions. Without:
    one Lance ANN query per row."""
    col = layer_column(layer)
    q = read_fragments(ref, fragment_ids, [col], query_filter)
    qpos = np.searchsorted(corpus.rowids, q["_rowid"].to_numpy())
    qv = unit_rows(to_matrix(q[col]))  # (n, D)
    del q
    n = len(qpos)
    own = corpus.codes[qpos]
    nb = np.full((n, fetch), -1, np.int64)
    sims = np.full((n, fetch), -np.inf, np.float32)
    if corpus.vectors is not None:
        if corpus.centroids is None:  # exact: every row against everything
            for s in range(0, n, _BLOCK):
                blk = slice(s, s + _BLOCK)
                nb[blk], sims[blk] = _exact_block(qv[blk], own[blk], corpus, fetch)
        else:
            for s in range(0, n, _QUERY_CHUNK):
                blk = slice(s, s + _QUERY_CHUNK)
                nb[blk], sims[blk] = _ivf_search(qv[blk], own[blk], corpus, fetch)
    else:
        assert ann is not None
        ds = ref.open()
        for i in range(n):
            res = ds.to_table(
                columns=[],
                with_row_id=True,
                nearest={"column": col, "q": qv[i], "k": fetch + 1, "metric": "cosine", **ann},
            )
            pos = np.searchsorted(corpus.rowids, res["_rowid"].to_numpy())
            dist = res["_distance"].to_numpy()
            keep = corpus.codes[pos] != own[i]
            pos, dist = pos[keep][:fetch], dist[keep][:fetch]
            nb[i, : len(pos)] = pos
            sims[i, : len(pos)] = 1.0 - dist
    sims[nb < 0] = -np.inf
    nb[~np.isfinite(sims)] = -1  # left-out rows (own track) where a list ran short
    return qpos, nb, sims


# --------------------------------------------------------------------------- the run


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
    ds = _open_or_none(_duplicates_ref(store_ref(store, storage_options)))
    return None if ds is None else ds.to_table()


def _duplicates_ref(ref: StoreRef) -> StoreRef:
    """``duplicates.lance`` of the store of ``ref``, unpinned."""
    return StoreRef(ref.root, ref.lance_options, "duplicates")


def _open_or_none(ref: StoreRef) -> Any:
    try:
        return ref.open()
    except (ValueError, OSError):
        return None


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
        StoreNotFoundError, UnknownLayerError (pipeline.search); ValueError for a bad level or
        an incremental run without a previous run of the same level and layer.
    """
    import lance

    t0 = time.perf_counter()
    crit = criterion or Criterion()
    if level not in LEVELS:
        raise ValueError(f"level must be track or window, got {level!r}")
    tracks_ref = store_ref(store, storage_options)
    tracks = tracks_ref.open()
    ref = tracks_ref if level == "track" else store_ref(store, storage_options, "windows")
    ds = ref.open()
    check_layers(ds, [layer])
    col = layer_column(layer)
    report = DuplicateReport(level=level, layer=layer, criterion=asdict(crit), incremental=incremental)
    report.run_id = (
        "dup-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    )
    now = dt.datetime.now(dt.timezone.utc)

    # what to query: everything, or (incremental) the tracks embedded since the previous run
    keep_old: list[dict[str, Any]] = []
    query_ids: list[str] | None = None
    live = set(tracks.to_table(columns=["track_id"])["track_id"].to_pylist())
    if incremental:
        old = read_duplicates(store, storage_options)
        if old is None or old.num_rows == 0:
            raise ValueError("--incremental needs a previous run; run find_duplicates once without it")
        old_rows = [r for r in old.to_pylist() if r["level"] == level and r["layer"] == layer]
        if not old_rows:
            raise ValueError(f"--incremental: the previous run was not at {level} level, layer {layer}")
        since = max(r["computed_at"] for r in old_rows)
        t = tracks.to_table(columns=["track_id", "embedded_at"])
        query_ids = [
            tid
            for tid, at in zip(t["track_id"].to_pylist(), t["embedded_at"].to_pylist(), strict=True)
            if at is None or at > since
        ]
        fresh = set(query_ids)
        keep_old = [
            r
            for r in old_rows
            if r["track_id"] in live
            and r["match_track_id"] in live
            and r["track_id"] not in fresh
            and r["match_track_id"] not in fresh
        ]

    # the corpus: ids (and, unless Lance's per-query search is used, the unit vectors) of every
    # row, positions sorted by row id
    ivf = _ivf_index(ds, col, crit.k) if use_index else None
    ann = ivf[0] if ivf else None
    n_rows = ds.count_rows()
    dim = check_layers(ds, [layer])
    if ann_mode not in ANN_MODES:
        raise ValueError(f"ann_mode must be one of {', '.join(ANN_MODES)}, got {ann_mode!r}")
    lance_search = ivf is not None and (
        ann_mode == "lance" or (ann_mode == "auto" and n_rows * dim * 4 > max_corpus_bytes)
    )
    meta_cols = ["track_id"] + (["start_s", "end_s"] if level == "window" else [])
    ctab = ds.to_table(columns=[*meta_cols] + ([] if lance_search else [col]), with_row_id=True)
    order = np.argsort(ctab["_rowid"].to_numpy(), kind="stable")
    members = ptr = centroids = vectors = None
    nprobes = 1
    if not lance_search:
        raw = to_matrix(ctab[col])  # (N, D) in table order
        ctab = ctab.drop_columns([col])
        if ivf is not None:
            centroids = unit_rows(ivf[1])
            nprobes = int(min(ann["nprobes"], len(centroids)))  # type: ignore[index]
        # one copy in partition order, normalised in place (peak: two copies of the vectors)
        members, ptr = _partitioned(raw, order, centroids)
        vectors = raw[order[members]]
        del raw
        for s in range(0, len(vectors), 65536):
            vectors[s : s + 65536] = unit_rows(vectors[s : s + 65536])
    ctab = ctab.take(pa.array(order))
    tids = ctab["track_id"].to_numpy(zero_copy_only=False)
    uniq, codes = np.unique(tids, return_inverse=True)
    corpus = _Corpus(
        rowids=ctab["_rowid"].to_numpy(), codes=codes.astype(np.int64), vectors=vectors,
        members=members, ptr=ptr, centroids=centroids, nprobes=nprobes,
    )  # fmt: skip
    del vectors
    report.exact = ivf is None
    report.method = "lance" if lance_search else ("exact" if ivf is None else "ivf-batched")
    if ivf is not None:
        report.partitions, report.nprobes = len(ivf[1]), int(ann["nprobes"])  # type: ignore[index]
    if use_ray is None:
        use_ray = n_rows >= ray_min_rows
    report.ray = bool(use_ray)
    n_groups = 1
    if use_ray:
        import ray

        from pipeline.flow.runtime import ensure_ray

        ensure_ray()
        n_groups = max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    groups = fragment_groups(ds, n_groups)
    fetch = crit.k if level == "track" else crit.k * 4 + 8
    shared = {
        "ref": ref,
        "layer": layer,
        "fetch": fetch,
        "query_filter": id_filter("track_id", query_ids),
        "corpus": corpus,
        "ann": ann if lance_search else None,
    }
    t_search = time.perf_counter()
    results = run_tasks(_neighbour_task, groups, shared, use_ray)
    report.search_s = time.perf_counter() - t_search
    qpos = np.concatenate([r[0] for r in results]) if results else np.zeros(0, np.int64)
    nb = np.concatenate([r[1] for r in results]) if results else np.zeros((0, fetch), np.int64)
    sims = np.concatenate([r[2] for r in results]) if results else np.zeros((0, fetch), np.float32)
    del results
    report.queried = len(qpos)

    accepted: list[tuple[int, int, float]] = []  # (query row, neighbour row, cosine)
    if level == "track":
        ratio, ms = _gap_rows(sims, crit)
        ratios = ratio[np.isfinite(ratio)]
        for i in np.flatnonzero(ms):
            accepted += [(int(qpos[i]), int(nb[i, j]), float(sims[i, j])) for j in range(ms[i])]
    else:
        ratio_list: list[float] = []
        for i in range(len(qpos)):
            pos, s = nb[i], sims[i]
            ok = pos >= 0
            pos, s = pos[ok], s[ok]
            _, first = np.unique(corpus.codes[pos], return_index=True)  # best window per other track
            first.sort()
            pos, s = pos[first][: crit.k], s[first][: crit.k]
            if len(s) >= 2:
                ratio_list.append(float((1.0 - s[0]) / max(1e-12, 1.0 - s[1])))
            m = gap_matches(s, crit)
            accepted += [(int(qpos[i]), int(pos[j]), float(s[j])) for j in range(m)]
        ratios = np.asarray(ratio_list)
    if len(ratios):
        qs = np.quantile(np.asarray(ratios), [0.001, 0.01, 0.5])
        report.gap_ratio_quantiles = {"p0.1": float(qs[0]), "p1": float(qs[1]), "p50": float(qs[2])}

    rows = (
        _track_pairs(accepted, ctab, level, crit) if level == "track" else _window_pairs(accepted, ctab, crit)
    )
    base = {
        "level": level,
        "layer": layer,
        "criterion": crit.to_json(),
        "run_id": report.run_id,
        "computed_at": now,
    }
    new_rows = [{**base, **r} for r in rows]
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
    if write:
        dup = _duplicates_ref(ref)
        first = _open_or_none(dup) is None  # an "overwrite" of nothing makes Lance warn
        lance.write_dataset(
            out, dup.uri, schema=DUPLICATES_SCHEMA, mode="create" if first else "overwrite",
            storage_options=ref.lance_options,
        )  # fmt: skip
    report.wall_s = time.perf_counter() - t0
    return out, report


def _track_pairs(
    accepted: list[tuple[int, int, float]], ctab: pa.Table, level: str, crit: Criterion
) -> list[dict]:
    """Unordered pairs of matched tracks (best score of both directions)."""
    tids = ctab["track_id"].to_pylist()
    best: dict[tuple[str, str], float] = {}
    for a, b, s in accepted:
        key = tuple(sorted((tids[a], tids[b])))
        best[key] = max(best.get(key, -2.0), s)  # type: ignore[index]
    return [{"track_id": a, "match_track_id": b, "score": s} for (a, b), s in best.items()]


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
