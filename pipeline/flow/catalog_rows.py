"""The catalog as a Ray Dataset: its parts read side by side, each record checked in a map stage.

    catalog parts (pipeline.io.catalog.catalog_parts: a listing's sub-prefixes, a Parquet file's
    row groups, a whole CSV / JSON lines file)
        ──read_parts (a map stage, CPU tasks, one per part)──▶ CATALOG_ROWS_SCHEMA rows: each
          record checked as it is read (check_record: URI policy, stable id, metadata, row-size
          limit); unparsable and refused rows keep their reason

The duplicate ``track_id`` policy needs every row of an id together: the plan applies it per
hash partition (:mod:`pipeline.runs.ray_plan`). Nothing here grows with the catalog on the driver.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.io.catalog import (
    CatalogEntry,
    CatalogPart,
    CatalogSource,
    RejectedRow,
    catalog_entry,
    catalog_parts,
    iter_part,
)
from pipeline.io.uris import UriPolicy

#: Rows per block a read task yields.
ROWS_PER_BLOCK = 50_000
#: Bits of ``row_key`` that hold the row within its part (the part index is above them).
ROW_BITS = 40


def read_parts(
    batch: pa.Table, src: CatalogSource, policy: UriPolicy, max_row_chars: int
) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: the checked rows (:data:`schemas.CATALOG_ROWS_SCHEMA`)
    of the parts in ``batch`` (one JSON :class:`CatalogPart` per row), in blocks of
    :data:`ROWS_PER_BLOCK`. Each record goes through :func:`check_record` as it is read."""
    for text in batch["part"].to_pylist():
        part = CatalogPart(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})
        buf: list[dict[str, Any]] = []
        for row, rec in iter_part(src, part, max_row_chars):
            buf.append(check_record((part.ix << ROW_BITS) | row, row, rec, src.base, policy, max_row_chars))
            if len(buf) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(buf, schema=schemas.CATALOG_ROWS_SCHEMA)
                buf = []
        if buf:
            yield pa.Table.from_pylist(buf, schema=schemas.CATALOG_ROWS_SCHEMA)


def check_record(key: int, row: int, rec: dict[str, str | None] | RejectedRow, base: str, policy: UriPolicy,
                 max_row_chars: int) -> dict[str, Any]:  # fmt: skip
    """One raw record -> a :data:`schemas.CATALOG_ROWS_SCHEMA` row: URI policy, stable id,
    metadata, row-size limit (:func:`pipeline.io.catalog.catalog_entry` without the duplicate
    policy, which needs every row of an id: the plan applies it per hash partition)."""
    e = rec if isinstance(rec, RejectedRow) else catalog_entry(row, rec, base, policy, max_row_chars)
    if isinstance(e, CatalogEntry):
        return {"row_key": key, "row": row, "track_id": e.track_id, "uri": e.uri,
                "metadata_json": json.dumps(e.metadata) if e.metadata else "{}", "content_version": e.content_version}  # fmt: skip
    return {"row_key": key, "row": row, "track_id": e.track_id, "uri": e.uri, "error_type": e.error_type,
            "message": e.message}  # fmt: skip


def catalog_dataset(src: CatalogSource, policy: UriPolicy, max_row_chars: int) -> Any:
    """The catalog's rows as a lazy Ray Dataset (:data:`schemas.CATALOG_ROWS_SCHEMA`), one read
    task per part (:func:`pipeline.io.catalog.catalog_parts`)."""
    import ray

    parts = catalog_parts(src)
    items = [{"part": json.dumps(dataclasses.asdict(p))} for p in parts]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_parts,
        fn_kwargs={"src": src, "policy": policy, "max_row_chars": max_row_chars},
        batch_size=1,
        batch_format="pyarrow",
        max_retries=0,  # reads retry inside (with_retries); a catalog error is final
    )
