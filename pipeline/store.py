"""The embedding store: Lance tables under one root, written as data files in the workers with
one commit per table per run on the driver, or exported as Parquet.

A run writes data files first (in the workers) and publishes them with a single Lance commit per
table at the end, so a failed or killed run leaves the previous table versions untouched and
readable. Tables are committed in dependency order — windows, frames, then tracks — so a reader
that opens ``tracks`` at any moment finds the windows of every track it sees. Errors and runs are
append-only histories keyed by ``run_id``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.storage import join, lance_options

#: Values per ``IN (...)`` list of one filter predicate (longer lists are split).
IDS_PER_PREDICATE = 2000


def sql_str(value: str) -> str:
    """A SQL string literal for a Lance filter."""
    return "'" + str(value).replace("'", "''") + "'"


def in_list(column: str, values: Sequence[str]) -> str:
    """``column IN ('a', 'b', ...)``."""
    return f"{column} IN ({', '.join(sql_str(v) for v in values)})"


def in_lists(column: str, values: Sequence[str], per: int = IDS_PER_PREDICATE) -> Iterator[str]:
    """:func:`in_list` over ``values`` split into predicates of at most ``per`` values each."""
    for i in range(0, len(values), per):
        yield in_list(column, values[i : i + per])


def table_uri(root: str, table: str, fmt: str = "lance") -> str:
    return join(root, f"{table}.{fmt}")


class Store:
    """Handle on a store root (local path or ``s3://...``)."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.lance_options = lance_options(self.root, self.storage_options)
        if not self.root.startswith(("s3://", "s3a://", "gs://")) and "://" not in self.root:
            import os

            os.makedirs(self.root, exist_ok=True)

    def uri(self, table: str) -> str:
        return table_uri(self.root, table)

    def open(self, table: str, version: int | None = None):
        """The Lance dataset of ``table`` (latest or a pinned version), or ``None`` if absent."""
        import lance

        try:
            return lance.dataset(self.uri(table), version=version, storage_options=self.lance_options)
        except (ValueError, FileNotFoundError, OSError) as e:
            if (
                "not found" in str(e).lower()
                or "does not exist" in str(e).lower()
                or isinstance(e, FileNotFoundError)
            ):
                return None
            raise

    def exists(self, table: str) -> bool:
        return self.open(table) is not None

    def versions(self) -> dict[str, int]:
        out = {}
        for t in schemas.TABLES:
            ds = self.open(t)
            if ds is not None:
                out[t] = ds.version
        return out

    def commit(self, table: str, schema: pa.Schema, fragments: list[Any], mode: str) -> int:
        """Publish ``fragments`` as one new version of ``table``: ``overwrite`` replaces the rows
        (the old version stays readable until cleanup), ``append`` adds them. Returns the version."""
        import lance

        current = self.open(table)
        if current is None or mode == "overwrite":
            op = lance.LanceOperation.Overwrite(schema, fragments)
        elif mode == "append":
            if not fragments:
                return current.version
            op = lance.LanceOperation.Append(fragments)
        else:
            raise ValueError(f"unknown commit mode {mode!r}")
        ds = lance.LanceDataset.commit(
            self.uri(table),
            op,
            read_version=None if current is None else current.version,
            storage_options=self.lance_options,
        )
        return ds.version

    def write_small(self, table: str, data: pa.Table, mode: str = "append") -> int:
        """Driver-side write of a small table (errors, runs) in one commit."""
        import lance

        exists = self.exists(table)
        ds = lance.write_dataset(
            data,
            self.uri(table),
            schema=data.schema,
            mode=mode if exists else "create",
            storage_options=self.lance_options,
        )
        return ds.version


def write_parquet_table(
    ds, root: str, table: str, storage_options: Mapping[str, Any] | None, run_id: str
) -> str:
    """Write a Ray dataset as ``{root}/{table}.parquet/`` — staged under a run-specific prefix and
    then swapped in, so an interrupted export never mixes files of two runs."""
    from pipeline.catalog import open_uri

    final = table_uri(root, table, "parquet")
    staging = join(root, f".staging-{run_id}/{table}.parquet")
    fs, _ = open_uri(root, dict(storage_options or {}))
    ds.write_parquet(staging, filesystem=None if "://" not in root else fs)
    _swap(fs, staging, final)
    return final


def write_parquet_small(
    data: pa.Table, root: str, table: str, storage_options: Mapping[str, Any] | None
) -> str:
    import pyarrow.parquet as pq

    from pipeline.catalog import open_uri

    final = table_uri(root, table, "parquet")
    fs, path = open_uri(final, dict(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    with fs.open(path + "/part-0.parquet", "wb") as f:
        pq.write_table(data, f)
    return final


def _swap(fs, staging: str, final: str) -> None:
    def strip(u: str) -> str:
        return u.split("://", 1)[1] if "://" in u else u

    s, f = strip(staging), strip(final)
    old = f + ".old"
    if fs.exists(old):
        fs.rm(old, recursive=True)
    if fs.exists(f):
        fs.mv(f, old, recursive=True)
    fs.mv(s, f, recursive=True)
    if fs.exists(old):
        fs.rm(old, recursive=True)
