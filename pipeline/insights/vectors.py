"""Reading layer vectors from a store and writing derived columns back into ``tracks``.

Shared by the duplicate finder, the probes and the catalog map. Work is split by Lance fragment:
:func:`fragment_groups` cuts a table's fragments into groups of about equal row counts, and
:func:`run_tasks` runs one function per group, in this process for small stores and as Ray tasks
(``ray_min_rows`` and up) for large ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import StoreNotFoundError, UnknownLayerError
from pipeline.io.objects import lance_options
from pipeline.schemas import is_derived_column, layer_column
from pipeline.search.reader import open_store
from pipeline.store.tables import in_lists

#: Stores with at least this many rows are processed as Ray tasks over fragment groups.
RAY_MIN_ROWS = 100_000


@dataclass(frozen=True)
class StoreRef:
    """What a worker needs to open a table of the store: root, Lance options, pinned version."""

    root: str
    lance_options: dict[str, str] | None
    table: str = "tracks"
    version: int | None = None

    @property
    def uri(self) -> str:
        return f"{self.root.rstrip('/')}/{self.table}.lance"

    def open(self):
        import lance

        return lance.dataset(self.uri, version=self.version, storage_options=self.lance_options)

    def latest(self) -> StoreRef:
        """The same table, unpinned (its newest version when opened)."""
        return StoreRef(self.root, self.lance_options, self.table)


def store_ref(root: str, storage_options: Mapping[str, Any] | None, table: str = "tracks") -> StoreRef:
    """A :class:`StoreRef` pinned at the table's current version; raises when the store or the
    table is missing (``StoreNotFoundError``)."""
    import lance

    reader = open_store(root, storage_options)  # validates the root (tracks.lance exists)
    opts = lance_options(reader.root, storage_options)
    ref = StoreRef(reader.root, opts, table)
    try:
        ds = lance.dataset(ref.uri, storage_options=opts)
    except (ValueError, OSError) as e:
        raise StoreNotFoundError(f"the store at {reader.root} has no {table}.lance: {e}") from None
    return StoreRef(reader.root, opts, table, ds.version)


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


# --------------------------------------------------------------------------- writing columns


def write_track_columns(ref: StoreRef, data: pa.Table) -> int:
    """Write the columns of ``data`` (``track_id`` plus derived columns, see
    :func:`pipeline.schemas.is_derived_column`) into ``tracks`` on ``track_id``.

    Columns new to the table are added with Lance ``merge`` (a join on ``track_id`` that writes
    only the new columns' data files; tracks missing from ``data`` get nulls). When every column
    exists already, the given rows are updated in place with a partial ``merge_insert``
    (other rows and columns untouched). Returns the new table version.
    """
    import lance

    bad = [c for c in data.column_names if c != "track_id" and not is_derived_column(c)]
    if bad or "track_id" not in data.column_names:
        raise ValueError(f"write_track_columns takes track_id plus derived columns, got {data.column_names}")
    ds = lance.dataset(ref.uri, storage_options=ref.lance_options)
    have = set(ds.schema.names)
    new = [c for c in data.column_names if c != "track_id" and c not in have]
    old = [c for c in data.column_names if c != "track_id" and c in have]
    if new:
        ds.merge(data.select(["track_id", *new]), left_on="track_id")
        ds = lance.dataset(ref.uri, storage_options=ref.lance_options)
    if old and data.num_rows:
        part = data.select(["track_id", *old])
        want = ds.schema
        part = pa.table(
            {c: part[c].cast(want.field(c).type) for c in part.column_names},
        )
        ds.merge_insert("track_id").when_matched_update_all().execute(part)
        ds = lance.dataset(ref.uri, storage_options=ref.lance_options)
    return ds.version
