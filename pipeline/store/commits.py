"""Store commits that survive broken connections: every write is retried when its connection
broke, and the non-idempotent ones (appends) first check whether the earlier try landed.

object_store retries 5xx answers itself, but not a conditional PUT (a manifest) whose
connection broke: the commit may or may not have happened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pyarrow as pa

from pipeline.store.tables import Store, sql_str

log = logging.getLogger("musicfm.pipeline")

T = TypeVar("T")


_AMBIGUOUS_WRITE = (
    "error sending request",
    "connection reset",
    "connection closed",
    "broken pipe",
    "timed out",
)


def is_ambiguous_write(e: BaseException) -> bool:
    """A store write whose connection broke: it may or may not have taken effect."""
    from lance.commit import CommitConflictError

    return (
        isinstance(e, OSError)
        and not isinstance(e, CommitConflictError)
        and any(s in str(e).lower() for s in _AMBIGUOUS_WRITE)
    )


def retry_write(what: str, write: Callable[[], T], landed: Callable[[], T | None] | None = None,
                tries: int = 5) -> T:  # fmt: skip
    """Run a store write, retried (with backoff) when its connection broke.

    object_store retries 5xx answers itself, but not a conditional PUT (a manifest) whose
    connection broke: the commit may or may not have happened. Idempotent writes (an Overwrite of
    the same files, a ``merge_insert`` of the same rows, a delete) are simply retried; for the
    others ``landed`` is asked first and returns the result if the earlier try did take effect.
    """
    for i in range(tries):
        try:
            return write()
        except OSError as e:
            if i + 1 >= tries or not is_ambiguous_write(e):
                raise
            log.warning("%s failed (%s); %sretrying", what, str(e).splitlines()[0][:200],
                        "checking, then " if landed else "")  # fmt: skip
            time.sleep(0.5 * 2**i)
            if landed is not None:
                got = landed()
                if got is not None:
                    return got
    raise AssertionError("unreachable")


def commit_overwrite(store: Store, name: str, schema: pa.Schema, fragments: list, tries: int = 5) -> int:
    """``store.commit(..., mode="overwrite")``, retried when the request may not have arrived
    (re-committing an Overwrite is safe either way: at worst one more version, same files)."""
    return retry_write(
        f"commit of {name}", lambda: store.commit(name, schema, fragments, mode="overwrite"), tries=tries
    )


def append_fragments_once(store: Store, name: str, schema: pa.Schema, fragments: list, tries: int = 5) -> int:
    """``store.commit(..., mode="append")``, retried when the connection broke; before a retry
    the table is read to see whether the fragments' data files are in it already (no double append)."""

    def landed() -> int | None:
        ds = store.open(name)
        if ds is None or not fragments:
            return None
        mine = {f.path for f in fragments[0].files}
        have = {f.path for fr in ds.get_fragments() for f in fr.metadata.files}
        return ds.version if mine & have else None

    return retry_write(
        f"commit of {name}", lambda: store.commit(name, schema, fragments, mode="append"), landed, tries
    )


def append_once(store: Store, name: str, data: pa.Table, run_id: str, tries: int = 5) -> int:
    """``store.write_small(name, data)`` (an append of rows carrying ``run_id``), retried when the
    commit's connection broke: before retrying, the table is read to see whether this run's rows
    landed after all, so a retry never appends them twice."""

    def landed() -> int | None:
        ds = store.open(name)
        if ds is not None and ds.count_rows(filter=f"run_id = {sql_str(run_id)}") >= data.num_rows > 0:
            return ds.version
        return None

    return retry_write(f"append to {name}", lambda: store.write_small(name, data), landed, tries)


def delete_rows(ds: Any, predicate: str) -> int:
    """Delete rows matching ``predicate`` (retried if the connection broke: a delete is
    idempotent); returns the rows deleted (0 if none matched)."""
    res = retry_write(f"delete from {ds.uri.rstrip('/').rsplit('/', 1)[-1]}", lambda: ds.delete(predicate))
    n = getattr(res, "num_deleted_rows", None)
    if n is None and isinstance(res, Mapping):
        n = res.get("num_deleted_rows")
    return int(n or 0)


def merge_tracks(store: Store, tbl: pa.Table) -> int:
    """Upsert track rows on ``track_id`` (the tracks table is created by the first chunk)."""
    import lance

    ds = store.open("tracks")
    if ds is None:

        def landed() -> int | None:  # the create landed although its connection broke
            now = store.open("tracks")
            return now.version if now is not None else None

        return retry_write(
            "create of tracks",
            lambda: (
                lance.write_dataset(
                    tbl,
                    store.uri("tracks"),
                    schema=tbl.schema,
                    mode="create",
                    storage_options=store.lance_options,
                ).version
            ),  # fmt: skip
            landed,
        )
    retry_write(  # an upsert of the same rows again is harmless
        "merge of tracks",
        lambda: (
            ds.merge_insert("track_id").when_matched_update_all().when_not_matched_insert_all().execute(tbl)
        ),
    )
    return store.open("tracks").version
