"""The embedding store's tables: Lance datasets under one root, written as data files in the
workers and published by commits on the driver, plus the filter helpers.

:class:`Store` is the one handle on a store root: it opens tables (latest or at a pinned
version), hands picklable pinned references (:class:`StoreRef`) to workers that read projections
and vectors, writes data files (:func:`write_fragments`) and commits them. The package
:mod:`pipeline.store` is the only one that imports ``lance``: the commit retries are in
:mod:`.commits`, derived-column writes under the writers' lease in :mod:`.columns`, versions and
tags in :mod:`.snapshots`.

A run writes data files first (in the workers) and publishes them chunk by chunk (embed and refresh
alike: the commit protocol of :mod:`pipeline.runs.refresh`), each chunk in dependency order —
windows, frames, then its ``tracks`` rows — so a reader that opens ``tracks`` at any moment finds
the windows of every track it sees, and a failed or killed run leaves every committed chunk intact
and readable. Errors and runs are append-only histories keyed by ``run_id``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.errors import StoreNotFoundError
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


def is_not_found(exc: BaseException) -> bool:
    """Whether a Lance open failed because the table (or the version) is not there."""
    text = str(exc).lower()
    return isinstance(exc, FileNotFoundError) or any(
        s in text for s in ("not found", "does not exist", "no such")
    )


def open_dataset(
    uri: str, version: int | str | None = None, lance_opts: Mapping[str, str] | None = None
) -> Any:
    """The Lance dataset at ``uri`` (latest, or ``version``: a number or a tag), or ``None`` when
    there is none."""
    import lance

    if "://" not in uri and not os.path.isdir(uri):
        return None
    try:
        return lance.dataset(uri, version=version, storage_options=lance_opts)
    except (ValueError, OSError) as e:
        if is_not_found(e):
            return None
        raise


def write_fragments(uri: str, data: pa.Table, lance_opts: Mapping[str, str] | None) -> list[Any]:
    """Write ``data`` as data files of the table at ``uri`` (in a worker): invisible until a
    commit on the driver publishes the returned fragments (:meth:`Store.commit`)."""
    import lance

    return lance.fragment.write_fragments(data, uri, schema=data.schema, storage_options=lance_opts)


def fragments_to_json(fragments: Sequence[Any]) -> str:
    """Fragments as JSON text (Lance's public serialised form), to cross from a worker."""
    return json.dumps([f.to_json() for f in fragments])


def fragments_from_json(text: str | None) -> list[Any]:
    """The fragments of :func:`fragments_to_json` (``None`` -> none)."""
    from lance.fragment import FragmentMetadata

    return [FragmentMetadata.from_json(json.dumps(d)) for d in json.loads(text or "[]")]


@dataclass(frozen=True)
class StoreRef:
    """What a worker needs to open a table of the store: root, Lance options, pinned version
    (picklable, unlike an open dataset; made by :meth:`Store.ref`)."""

    root: str
    lance_options: dict[str, str] | None
    table: str = "tracks"
    version: int | None = None

    @property
    def uri(self) -> str:
        return f"{self.root.rstrip('/')}/{self.table}.lance"

    def open(self) -> Any:
        """The table at the pinned version (raises when it is gone)."""
        import lance

        return lance.dataset(self.uri, version=self.version, storage_options=self.lance_options)

    def open_or_none(self) -> Any:
        """The table at the pinned version, or ``None`` when it does not exist."""
        return open_dataset(self.uri, self.version, self.lance_options)

    def latest(self) -> StoreRef:
        """The same table, unpinned (its newest version when opened)."""
        return StoreRef(self.root, self.lance_options, self.table)

    def store(self) -> Store:
        """The :class:`Store` of this table's root (with the same Lance options)."""
        return Store(self.root, create=False, lance_opts=self.lance_options)


class Store:
    """The handle on a store root (local path or ``s3://...``) for writers and readers alike:
    :meth:`open` a table (latest or pinned), :meth:`ref` a pinned table for workers,
    :meth:`commit` data files, :meth:`write_small` / :meth:`write_table` whole small tables.
    ``create=False`` for readers (no directory is made)."""

    def __init__(
        self,
        root: str,
        storage_options: Mapping[str, Any] | None = None,
        create: bool = True,
        *,
        lance_opts: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        # Lance's own keys when given (a StoreRef carries them), else made from storage_options
        self.lance_options = (
            dict(lance_opts) if lance_opts else lance_options(self.root, self.storage_options)
        )
        if create and "://" not in self.root:
            import os

            os.makedirs(self.root, exist_ok=True)

    def uri(self, table: str) -> str:
        return table_uri(self.root, table)

    def open(self, table: str, version: int | str | None = None) -> Any:
        """The Lance dataset of ``table`` (latest or a pinned version or tag), or ``None`` if absent."""
        return open_dataset(self.uri(table), version, self.lance_options)

    def ref(self, table: str = "tracks") -> StoreRef:
        """A :class:`StoreRef` pinned at the table's current version; raises
        ``StoreNotFoundError`` when the table is missing."""
        import lance

        ref = StoreRef(self.root, self.lance_options, table)
        try:
            ds = lance.dataset(ref.uri, storage_options=self.lance_options)
        except (ValueError, OSError) as e:
            raise StoreNotFoundError(f"the store at {self.root} has no {table}.lance: {e}") from None
        return StoreRef(self.root, self.lance_options, table, ds.version)

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

    def write_table(self, table: str, data: pa.Table, schema: pa.Schema | None = None) -> int:
        """Replace the whole of a small ``table`` by ``data`` in one commit (created when absent;
        an overwrite of nothing would make Lance warn). Returns the version."""
        import lance

        ds = lance.write_dataset(
            data,
            self.uri(table),
            schema=schema or data.schema,
            mode="overwrite" if self.exists(table) else "create",
            storage_options=self.lance_options,
        )
        return ds.version
