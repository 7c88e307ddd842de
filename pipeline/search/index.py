"""Cosine ANN indexes over the vector columns of the embedding store.

:func:`build_indexes` gives every ``layer_{ix}`` column of ``tracks.lance`` and ``windows.lance``
a Lance vector index with ``metric="cosine"``, its parameters derived from the row count ``n``
and the dimension ``D`` (:func:`index_params`):

``IVF_PQ`` (the default, see "Choice" below)
    ``num_partitions = clamp(round(sqrt(n)), 1, n // 256, 4096)`` (sqrt(n) balances the cost of
    ranking the centroids against scanning the probed lists; Lance needs >= 256 rows per partition
    to train); ``num_sub_vectors = D / 16`` (16 dims per 8-bit code, the SIMD-friendly layout) when
    ``D >= 256``, else ``D / 8``, else the largest divisor of ``D`` leaving >= 2 dims per sub-vector.
``IVF_HNSW_SQ``
    ``num_partitions = clamp(round(n / 50_000), 1, n // 256)`` (HNSW graphs do the fine search, the
    IVF layer only shards them), 8-bit scalar quantisation, ``m = 20``, ``ef_construction = 150``.

Below :func:`exact_max_rows` rows (:data:`EXACT_MAX_VALUES` / ``D``: 5,000 rows of 1024-d
vectors) ``index_type="auto"`` builds no index. An exact flat scan costs ~``n * D``; Lance's flat
search measured on the 2-core dev machine (quiet / loaded): 2k x 1024 3.5 / 10 ms p50, 5k 12 / 48
ms, 10k 51 / 126 ms, 20k 134 / 302 ms, 200k 1.2 / 6.8 s, and 160k x 64 (same ``n * D`` as 10k x
1024) 141 ms loaded. 5k x 1024 is where exact search stops meeting the ~10 ms goal, while an
IVF_PQ index of 10k x 1024 takes ~35 s to train. Exact search has recall 1; ``Store.search``
then reports ``exact=True``.

Search parameters (:func:`search_params`): IVF_PQ probes ``nprobes = max(20, ceil(0.04 *
partitions))`` lists and re-ranks ``refine_factor = 10`` times ``k`` PQ candidates with
exact cosine distances; IVF_HNSW_SQ probes ``max(4, ceil(0.25 * partitions))`` graphs with ``ef =
max(100, 4k)`` and re-ranks ``2k`` candidates. Both meet recall@10 >= 0.95 on the clustered 1024-d
benchmark (``bench/search.py``). An unfiltered query probes exactly ``nprobes`` lists (Lance's
fixed ``nprobes``, the fastest mode); a query with a ``where`` prefilter passes it as Lance's
``minimum_nprobes`` instead, and Lance probes more lists until ``k`` matching rows are found, so
a filtered query still returns ``k`` rows whenever ``k`` rows match.

Incremental updates: rows appended or merged after the index was built live in unindexed
fragments, which Lance searches exactly next to the index, so they are found at once. Running
:func:`build_indexes` again on an indexed column calls ``optimize_indices`` (new rows are
assigned to the existing partitions; no retraining) unless ``replace=True``.

Choice: measured with ``bench/search.py`` (200k clustered unit vectors, 1024-d, k=10, 200
queries, on the shared 2-core dev machine whose load made every figure vary up to ~2x between
runs). IVF_PQ (447 partitions, 64 sub-vectors): built in 255 s; ``Store.search`` with the
defaults p50 8.1 ms / p95 15 ms at recall@10 0.996 (the raw Lance query 5.4 ms); with a
``where`` prefilter keeping 1/6 of the rows p50 17 ms at recall 0.993. IVF_HNSW_SQ (4
partitions): built in 794 s (3x longer), recall 0.78 when probing 2 of its 4 graphs and 1.000
when probing all 4 (the default) at p50 12.5 ms through ``Store.search`` (651316b, load ~20);
prefiltered queries p50 59 ms; on real-shaped vectors (``--vectors clips``) its recall at the
defaults is only 0.63 against 0.99 for IVF_PQ; and its index holds 1 byte per
dimension (1 KiB per vector) plus the graph, against 64 bytes per vector for PQ. IVF_PQ is the
default; IVF_HNSW_SQ is available with ``index_type="IVF_HNSW_SQ"``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import StoreNotFoundError, UnknownLayerError
from pipeline.schemas import layer_column, parse_layer_column
from pipeline.store.tables import Store

__all__ = [
    "DEFAULT_INDEX_TYPE",
    "EXACT_MAX_ROWS",
    "EXACT_MAX_VALUES",
    "INDEX_TYPES",
    "MIN_INDEX_ROWS",
    "IndexReport",
    "SearchParams",
    "build_indexes",
    "exact_max_rows",
    "index_params",
    "pq_sub_vectors",
    "search_params",
]

INDEX_TYPES = ("IVF_PQ", "IVF_HNSW_SQ")
DEFAULT_INDEX_TYPE = "IVF_PQ"
#: ``index_type="auto"`` leaves tables with fewer than ``EXACT_MAX_VALUES / D`` rows unindexed.
EXACT_MAX_VALUES = 5_000 * 1024
#: The exact-search threshold for 1024-d vectors (MusicFM's width).
EXACT_MAX_ROWS = EXACT_MAX_VALUES // 1024
#: Fewest rows an index can be trained on (one 8-bit PQ codebook / IVF partition).
MIN_INDEX_ROWS = 256
_MAX_PARTITIONS = 4096


# --------------------------------------------------------------------------- parameters


def exact_max_rows(dim: int) -> int:
    """Row count below which ``auto`` builds no index for ``dim``-d vectors (exact search)."""
    return max(MIN_INDEX_ROWS, EXACT_MAX_VALUES // max(1, int(dim)))


def pq_sub_vectors(dim: int) -> int:
    """Number of PQ sub-vectors for dimension ``dim``: 16 dims per sub-vector when that still
    gives at least 16 sub-vectors (``dim >= 256``, e.g. 64 for 1024), else 8 dims (small test
    models), else the largest divisor of ``dim`` leaving at least 2 dims per sub-vector."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    for per in (16, 8):
        if dim % per == 0 and (per == 8 or dim // per >= 16):
            return dim // per
    for n in range(dim // 2, 0, -1):
        if dim % n == 0:
            return n
    return 1


def index_params(num_rows: int, dim: int, index_type: str = DEFAULT_INDEX_TYPE) -> dict[str, Any]:
    """``create_index`` keyword arguments for ``num_rows`` vectors of size ``dim`` (see module doc)."""
    index_type = index_type.upper()
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    cap = max(1, min(_MAX_PARTITIONS, num_rows // MIN_INDEX_ROWS))
    if index_type == "IVF_PQ":
        return {
            "index_type": "IVF_PQ",
            "num_partitions": max(1, min(cap, round(math.sqrt(max(num_rows, 1))))),
            "num_sub_vectors": pq_sub_vectors(dim),
        }
    return {
        "index_type": "IVF_HNSW_SQ",
        "num_partitions": max(1, min(cap, round(num_rows / 50_000))),
        "m": 20,
        "ef_construction": 150,
    }


@dataclass(frozen=True)
class SearchParams:
    """Query-time ANN parameters (``None`` = not applicable to the index type)."""

    nprobes: int
    refine_factor: int | None
    ef: int | None


def search_params(
    index_type: str,
    num_partitions: int | None,
    k: int,
    *,
    nprobes: int | None = None,
    refine_factor: int | None = None,
) -> SearchParams:
    """Default ``nprobes`` / ``refine_factor`` / ``ef`` for an index (explicit values win).

    Chosen so recall@10 >= 0.95 on the benchmark (module doc); ``nprobes`` is capped at the
    number of partitions.
    """
    parts = int(num_partitions or 1)
    index_type = index_type.upper()
    if "HNSW" in index_type:
        np_ = nprobes or max(4, math.ceil(0.25 * parts))
        ef = max(100, 4 * int(k))
        rf = refine_factor or 2
    else:
        np_ = nprobes or max(20, math.ceil(0.04 * parts))
        ef = None
        rf = refine_factor or 10
    return SearchParams(nprobes=max(1, min(int(np_), parts)), refine_factor=int(rf), ef=ef)


# --------------------------------------------------------------------------- building


@dataclass
class IndexReport:
    """What :func:`build_indexes` did to one vector column.

    ``action``: ``"built"`` (new index), ``"rebuilt"`` (replaced), ``"optimized"`` (existing
    index updated incrementally), ``"exact"`` (too few rows for ``auto``: no index, exact search),
    ``"skipped"`` (too few rows to train any index).
    """

    table: str
    column: str
    layer: int
    num_rows: int
    dim: int
    action: str
    index_type: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _vector_columns(ds: Any) -> dict[int, int]:
    """layer -> dim of the ``layer_{ix}`` fixed-size-list columns of a Lance dataset."""
    import pyarrow as pa

    out = {}
    for f in ds.schema:
        ix = parse_layer_column(f.name)
        if ix is not None and pa.types.is_fixed_size_list(f.type):
            out[ix] = f.type.list_size
    return out


def _existing_index(ds: Any, column: str) -> tuple[str, str] | None:
    for desc in ds.describe_indices():
        if list(desc.field_names) == [column] and str(desc.index_type).upper().startswith("IVF"):
            return desc.name, str(desc.index_type).upper()
    return None


def build_indexes(
    store_uri: str,
    layers: Sequence[int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    index_type: str = "auto",
    *,
    tables: Sequence[str] = ("tracks", "windows"),
    min_rows: int | None = None,
    replace: bool = False,
) -> list[IndexReport]:
    """Build (or incrementally update) a cosine ANN index per vector column of the store.

    Args:
        store_uri: store root (local directory or ``s3://bucket/prefix``).
        layers: layers to index (default: every ``layer_{ix}`` column found).
        storage_options: as for :func:`pipeline.search.reader.open_store`.
        index_type: ``"auto"`` (:data:`DEFAULT_INDEX_TYPE` for tables of at least
            :func:`exact_max_rows` rows, else no index), ``"IVF_PQ"`` or ``"IVF_HNSW_SQ"``
            (built whenever the table has at least :data:`MIN_INDEX_ROWS` rows).
        tables: which tables to index (those absent from the store are skipped silently).
        min_rows: override the row threshold below which no index is built.
        replace: retrain existing indexes instead of updating them incrementally.

    Returns:
        One :class:`IndexReport` per (table, layer) considered.

    Raises:
        pipeline.errors.StoreNotFoundError: no ``tracks.lance`` under ``store_uri``.
        pipeline.errors.UnknownLayerError: a requested layer is not in the store.
        ValueError: unknown ``index_type``.
    """
    kind = index_type.upper() if index_type else "AUTO"
    if kind not in ("AUTO", *INDEX_TYPES):
        raise ValueError(f"index_type must be auto or one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    root = store_uri[len("file://") :] if store_uri.startswith("file://") else store_uri
    store = Store(root, storage_options, create=False)
    tracks = store.open("tracks")
    if tracks is None:
        raise StoreNotFoundError(f"no embedding store at {root}: cannot open {store.uri('tracks')}")
    if layers is not None:
        have = sorted(_vector_columns(tracks))
        missing = sorted(set(int(i) for i in layers) - set(have))
        if missing:
            avail = ", ".join(str(i) for i in have) or "none"
            raise UnknownLayerError(f"layers {missing} are not in the store; available layers: {avail}")
    reports: list[IndexReport] = []
    for table in tables:
        ds = store.open(table)
        if ds is None:
            continue
        vec_cols = _vector_columns(ds)
        wanted = sorted(vec_cols) if layers is None else [i for i in sorted(set(layers)) if i in vec_cols]
        for ix in wanted:
            dim = vec_cols[ix]
            if min_rows is not None:
                threshold = max(min_rows, MIN_INDEX_ROWS)
            else:
                threshold = exact_max_rows(dim) if kind == "AUTO" else MIN_INDEX_ROWS
            reports.append(_index_column(ds, table, ix, dim, kind, threshold, replace))
    return reports


def _index_column(
    ds: Any, table: str, layer: int, dim: int, kind: str, threshold: int, replace: bool
) -> IndexReport:
    column = layer_column(layer)
    n = ds.count_rows()
    rep = IndexReport(table=table, column=column, layer=layer, num_rows=n, dim=dim, action="")
    existing = _existing_index(ds, column)
    target = DEFAULT_INDEX_TYPE if kind == "AUTO" else kind
    t0 = time.perf_counter()
    if existing is not None and not replace and (kind == "AUTO" or existing[1] == target):
        ds.optimize.optimize_indices(index_names=[existing[0]])
        rep.action, rep.index_type = "optimized", existing[1]
        rep.reason = "existing index updated with the new rows (no retraining)"
    elif n < threshold:
        if n < MIN_INDEX_ROWS:
            rep.action = "skipped" if kind != "AUTO" else "exact"
            rep.reason = f"{n} rows: too few to train an index (< {MIN_INDEX_ROWS}); exact search"
        else:
            rep.action = "exact"
            rep.reason = f"{n} rows < {threshold}: exact search is fast enough, no index"
    else:
        params = index_params(n, dim, target)
        ds.create_index(column, metric="cosine", replace=True, **params)
        rep.action = "rebuilt" if existing is not None else "built"
        rep.index_type = params["index_type"]
        rep.params = {k: v for k, v in params.items() if k != "index_type"}
        rep.reason = f"{n} rows x {dim} dims"
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep
