"""Reading layer vectors from a store and writing derived columns back into ``tracks``.

Shared by the duplicate finder, the probes and the catalog map; the store's side (opening, the
pinned :class:`pipeline.store.tables.StoreRef`, :func:`pipeline.store.columns.write_track_columns`
under the lease) is in :mod:`pipeline.store`. Work is split by Lance fragment:
:func:`fragment_groups` cuts a table's fragments into groups of about equal row counts, and
:func:`run_tasks` runs one function per group, in this process for small stores and as Ray tasks
(``ray_min_rows`` and up) for large ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import UnknownLayerError
from pipeline.schemas import layer_column
from pipeline.search.reader import open_store

# re-exported: the insights name the store's pinned table reference and its derived-column write
# from here (both live in pipeline.store, the only package that opens Lance)
from pipeline.store.columns import write_track_columns as write_track_columns
from pipeline.store.tables import Store, in_lists
from pipeline.store.tables import StoreRef as StoreRef

#: Stores with at least this many rows are processed as Ray tasks over fragment groups.
RAY_MIN_ROWS = 100_000


def store_ref(root: str, storage_options: Mapping[str, Any] | None, table: str = "tracks") -> StoreRef:
    """A :class:`StoreRef` pinned at the table's current version; raises when the store or the
    table is missing (``StoreNotFoundError``)."""
    reader = open_store(root, storage_options)  # validates the root (tracks.lance exists)
    return Store(reader.root, storage_options, create=False).ref(table)


def check_layers(ds: Any, layers: Sequence[int]) -> int:
    """Raise ``UnknownLayerError`` for a layer without a vector column; returns the dimension."""
    have = {f.name: f.type for f in ds.schema if pa.types.is_fixed_size_list(f.type)}
    missing = [ix for ix in layers if layer_column(ix) not in have]
    if missing:
        avail = sorted(int(n[6:]) for n in have if n.startswith("layer_") and n[6:].isdigit())
        raise UnknownLayerError(
            f"layer {missing[0]} is not in {ds.uri.rstrip('/').rsplit('/', 1)[-1]}; available layers: "
            + (", ".join(str(i) for i in avail) or "none")
        )
    return int(have[layer_column(layers[0])].list_size)


def to_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as a float32 matrix (N, D)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    dim = arr.type.list_size
    if len(arr) == 0:
        return np.zeros((0, dim), np.float32)
    flat = arr.flatten().to_numpy(zero_copy_only=False)  # respects the array's offset
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(arr), dim)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, np.where(n > 0, n, np.float32(1.0)), dtype=np.float32)  # one new array


def id_filter(column: str, ids: Sequence[str] | None) -> str | None:
    """``column IN (...)`` over ``ids`` (split into OR-ed lists), ``None`` for no restriction."""
    if ids is None:
        return None
    if not ids:
        return "false"
    return " OR ".join(f"({p})" for p in in_lists(column, list(ids)))


def fragment_groups(ds: Any, n_groups: int) -> list[list[int]]:
    """Fragment ids cut into at most ``n_groups`` groups of about equal row counts."""
    frags = [(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]
    frags = [f for f in frags if f[1] > 0]
    if not frags:
        return []
    n_groups = max(1, min(n_groups, len(frags)))
    total = sum(n for _, n in frags)
    groups: list[list[int]] = [[]]
    acc = 0
    for fid, n in frags:
        if acc >= total * len(groups) / n_groups and len(groups) < n_groups:
            groups.append([])
        groups[-1].append(fid)
        acc += n
    return [g for g in groups if g]


def read_fragments(
    ref: StoreRef, fragment_ids: Sequence[int], columns: Sequence[str], filt: str | None = None
) -> pa.Table:
    """The rows of the given fragments (``columns`` plus ``_rowid``), optionally filtered."""
    ds = ref.open()
    parts = []
    for fid in fragment_ids:
        frag = ds.get_fragment(fid)
        parts.append(frag.to_table(columns=list(columns), filter=filt, with_row_id=True))
    if not parts:
        return ds.schema.empty_table().select(list(columns))
    return pa.concat_tables(parts)


def run_tasks(
    fn: Callable[..., Any], groups: Sequence[Any], shared: Mapping[str, Any], use_ray: bool
) -> list[Any]:
    """``fn(group, **shared)`` for every group: Ray tasks (``shared`` put in the object store
    once) when ``use_ray``, else in this process. Results in group order."""
    if not use_ray:
        return [fn(g, **shared) for g in groups]
    import ray

    from pipeline.flow.runtime import ensure_ray

    ensure_ray()
    refs = {k: ray.put(v) for k, v in shared.items()}
    remote = ray.remote(num_cpus=1, max_retries=2)(_call)
    return ray.get([remote.remote(fn, g, **refs) for g in groups])


def _call(fn: Callable[..., Any], group: Any, **shared: Any) -> Any:
    return fn(group, **shared)


def ray_groups(ds: Any, use_ray: bool | None, ray_min_rows: int = RAY_MIN_ROWS) -> tuple[bool, int]:
    """(use Ray, number of fragment groups) for a table: Ray for ``ray_min_rows`` and up (or when
    forced), one group per two CPUs of the cluster... or one group without Ray."""
    n = ds.count_rows()
    if use_ray is None:
        use_ray = n >= ray_min_rows
    if not use_ray:
        return False, 1
    import ray

    from pipeline.flow.runtime import ensure_ray

    ensure_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return True, max(1, 2 * cpus)
