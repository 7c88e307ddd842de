"""Nearest neighbours of every row of a store table, for the duplicate finder.

Through the layer's cosine IVF index when it has one (``batched``: the index's partitions
scored at once against all the queries that probe them; ``lance``: one Lance ANN query per
row), else exact (blocked matrix products). Rows of the query's own track are left out. Work is
split by fragment group, in this process or as Ray tasks (:func:`pipeline.insights.vectors.run_tasks`).
See :mod:`pipeline.insights.duplicates` for the modes and their measured costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.insights.vectors import (
    StoreRef,
    check_layers,
    fragment_groups,
    read_fragments,
    run_tasks,
    to_matrix,
    unit_rows,
)
from pipeline.schemas import layer_column

__all__ = ["ANN_MODES", "MAX_CORPUS_BYTES", "Neighbours", "search_neighbours"]

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


@dataclass
class Neighbours:
    """What :func:`search_neighbours` found: the corpus rows (``ctab``: ``track_id`` and, for
    windows, ``start_s`` / ``end_s``, by position), the query positions (n,), their neighbour
    positions (n, fetch; -1 pads) and cosines (n, fetch; -inf pads), and how it searched."""

    ctab: pa.Table
    codes: np.ndarray
    qpos: np.ndarray
    nb: np.ndarray
    sims: np.ndarray
    method: str  # exact | ivf-batched | lance
    partitions: int
    nprobes: int
    search_s: float


def _load_corpus(
    ds: Any, col: str, meta_cols: list[str], ivf: tuple[dict[str, Any], np.ndarray] | None, lance_search: bool
) -> tuple[pa.Table, _Corpus]:
    """(metadata of every row by position, the corpus): positions are ranks by ``_rowid``; the
    unit vectors (unless Lance's own search is used) in partition order."""
    ctab = ds.to_table(columns=[*meta_cols] + ([] if lance_search else [col]), with_row_id=True)
    order = np.argsort(ctab["_rowid"].to_numpy(), kind="stable")
    members = ptr = centroids = vectors = None
    nprobes = 1
    if not lance_search:
        raw = to_matrix(ctab[col])  # (N, D) in table order
        ctab = ctab.drop_columns([col])
        if ivf is not None:
            centroids = unit_rows(ivf[1])
            nprobes = int(min(ivf[0]["nprobes"], len(centroids)))
        # one copy in partition order, normalised in place (peak: two copies of the vectors)
        members, ptr = _partitioned(raw, order, centroids)
        vectors = raw[order[members]]
        del raw
        for s in range(0, len(vectors), 65536):
            vectors[s : s + 65536] = unit_rows(vectors[s : s + 65536])
    ctab = ctab.take(pa.array(order))
    tids = ctab["track_id"].to_numpy(zero_copy_only=False)
    _, codes = np.unique(tids, return_inverse=True)
    corpus = _Corpus(
        rowids=ctab["_rowid"].to_numpy(), codes=codes.astype(np.int64), vectors=vectors,
        members=members, ptr=ptr, centroids=centroids, nprobes=nprobes,
    )  # fmt: skip
    return ctab, corpus


def search_neighbours(
    ref: StoreRef,
    layer: int,
    k: int,
    fetch: int,
    query_filter: str | None,
    use_index: bool,
    ann_mode: str,
    max_corpus_bytes: int,
    use_ray: bool,
) -> Neighbours:
    """The ``fetch`` nearest rows of other tracks for every row of ``ref``'s table that
    ``query_filter`` keeps (``k``: the list size the index's search parameters are set for)."""
    import time

    if ann_mode not in ANN_MODES:
        raise ValueError(f"ann_mode must be one of {', '.join(ANN_MODES)}, got {ann_mode!r}")
    ds = ref.open()
    col = layer_column(layer)
    dim = check_layers(ds, [layer])
    ivf = _ivf_index(ds, col, k) if use_index else None
    lance_search = ivf is not None and (
        ann_mode == "lance" or (ann_mode == "auto" and ds.count_rows() * dim * 4 > max_corpus_bytes)
    )
    meta_cols = ["track_id"] + (["start_s", "end_s"] if ref.table == "windows" else [])
    ctab, corpus = _load_corpus(ds, col, meta_cols, ivf, lance_search)
    n_groups = 1
    if use_ray:
        import ray

        from pipeline.flow.runtime import ensure_ray

        ensure_ray()
        n_groups = max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    shared = {
        "ref": ref, "layer": layer, "fetch": fetch, "query_filter": query_filter, "corpus": corpus,
        "ann": ivf[0] if (ivf is not None and lance_search) else None,
    }  # fmt: skip
    t0 = time.perf_counter()
    results = run_tasks(_neighbour_task, fragment_groups(ds, n_groups), shared, use_ray)
    search_s = time.perf_counter() - t0
    qpos = np.concatenate([r[0] for r in results]) if results else np.zeros(0, np.int64)
    nb = np.concatenate([r[1] for r in results]) if results else np.zeros((0, fetch), np.int64)
    sims = np.concatenate([r[2] for r in results]) if results else np.zeros((0, fetch), np.float32)
    method = "lance" if lance_search else ("exact" if ivf is None else "ivf-batched")
    return Neighbours(
        ctab=ctab, codes=corpus.codes, qpos=qpos, nb=nb, sims=sims, method=method,
        partitions=0 if ivf is None else len(ivf[1]), nprobes=0 if ivf is None else int(ivf[0]["nprobes"]),
        search_s=search_s,
    )  # fmt: skip
