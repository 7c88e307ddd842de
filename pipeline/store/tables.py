"""The embedding store's tables: Lance datasets under one root, written as data files in the
workers and published by commits on the driver (:class:`StoreWriter`), plus the filter helpers.

A run writes data files first (in the workers) and publishes them chunk by chunk (embed and refresh
alike: the commit protocol of :mod:`pipeline.runs.refresh`), each chunk in dependency order —
windows, frames, then its ``tracks`` rows — so a reader that opens ``tracks`` at any moment finds
the windows of every track it sees, and a failed or killed run leaves every committed chunk intact
and readable. Errors and runs are append-only histories keyed by ``run_id``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.io.objects import join, lance_options

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


class StoreWriter:
    """Write handle on a store root (local path or ``s3://...``); readers use
    :class:`pipeline.search.reader.StoreReader`."""

    def __init__(
        self, root: str, storage_options: Mapping[str, Any] | None = None, create: bool = True
    ) -> None:
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.lance_options = lance_options(self.root, self.storage_options)
        if create and "://" not in self.root:
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
