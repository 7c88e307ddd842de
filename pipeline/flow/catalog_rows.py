"""The catalog as a Ray Dataset: its parts read side by side, each record checked in a map stage.

    catalog parts (pipeline.io.catalog.catalog_parts: a listing's sub-prefixes, a Parquet file's
    row groups, a whole CSV / JSON lines file)
        ──read_parts (CPU tasks)──▶ raw records (JSON text) | unparsable rows
        ──check_rows (CPU tasks)──▶ CATALOG_ROWS_SCHEMA rows: URI policy, stable ids, metadata,
                                    row-size limit; rejected rows keep their reason

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

RAW_SCHEMA = pa.schema(
    [
        ("row_key", pa.int64()),
        ("row", pa.int64()),
        ("record", pa.string()),
        ("track_id", pa.string()),
        ("uri", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


def read_parts(batch: pa.Table, src: CatalogSource, max_row_chars: int) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: the raw records of the parts in ``batch`` (one JSON
    :class:`CatalogPart` per row), in blocks of :data:`ROWS_PER_BLOCK`."""
    for text in batch["part"].to_pylist():
        part = CatalogPart(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})
        buf: list[dict[str, Any]] = []
        for row, rec in iter_part(src, part, max_row_chars):
            key = (part.ix << ROW_BITS) | row
            if isinstance(rec, RejectedRow):
                buf.append({"row_key": key, "row": row, "record": None, "track_id": rec.track_id, "uri": rec.uri,
                            "error_type": rec.error_type, "message": rec.message})  # fmt: skip
            else:
                buf.append({"row_key": key, "row": row, "record": json.dumps(rec, ensure_ascii=False)})
            if len(buf) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(buf, schema=RAW_SCHEMA)
                buf = []
        if buf:
            yield pa.Table.from_pylist(buf, schema=RAW_SCHEMA)


def check_rows(batch: pa.Table, base: str, policy: UriPolicy, max_row_chars: int) -> pa.Table:
    """Ray Data ``map_batches`` function: raw records -> :data:`schemas.CATALOG_ROWS_SCHEMA` rows
    (:func:`pipeline.io.catalog.catalog_entry` without the duplicate policy)."""
    out: list[dict[str, Any]] = []
    for r in batch.to_pylist():
        if r["record"] is None:
            out.append({**r, "metadata_json": None, "content_version": None})
            continue
        e = catalog_entry(r["row"], json.loads(r["record"]), base, policy, max_row_chars)
        if isinstance(e, CatalogEntry):
            out.append({"row_key": r["row_key"], "row": r["row"], "track_id": e.track_id, "uri": e.uri,
                        "metadata_json": json.dumps(e.metadata) if e.metadata else "{}",
                        "content_version": e.content_version})  # fmt: skip
        else:
            out.append({"row_key": r["row_key"], "row": r["row"], "track_id": e.track_id, "uri": e.uri,
                        "error_type": e.error_type, "message": e.message})  # fmt: skip
    return pa.Table.from_pylist(out, schema=schemas.CATALOG_ROWS_SCHEMA)


def catalog_dataset(src: CatalogSource, policy: UriPolicy, max_row_chars: int) -> Any:
    """The catalog's rows as a lazy Ray Dataset (:data:`schemas.CATALOG_ROWS_SCHEMA`), one read
    task per part (:func:`pipeline.io.catalog.catalog_parts`)."""
    import ray

    parts = catalog_parts(src)
    items = [{"part": json.dumps(dataclasses.asdict(p))} for p in parts]
    raw = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_parts,
        fn_kwargs={"src": src, "max_row_chars": max_row_chars},
        batch_size=1,
        batch_format="pyarrow",
        max_retries=0,  # reads retry inside (with_retries); a catalog error is final
    )
    return raw.map_batches(
        check_rows,
        fn_kwargs={"base": src.base, "policy": policy, "max_row_chars": max_row_chars},
        batch_size=None,
        batch_format="pyarrow",
    )
