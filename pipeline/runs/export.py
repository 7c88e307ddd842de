"""Parquet export of a store's committed Lance tables.

Each table is read at its latest committed version, batch by batch (bounded memory whatever the
store's size), and written as ``{out}/{table}.parquet/part-NNNNN.parquet``. The files go to a
staging prefix first and are swapped in at the end, so an interrupted export never mixes files
of two exports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline import schemas
from pipeline.io.objects import join, open_uri
from pipeline.store.tables import Store

__all__ = ["export_parquet"]

#: Rows per Parquet file of the export.
ROWS_PER_FILE = 250_000


def export_parquet(
    root: str,
    storage_options: Mapping[str, Any] | None = None,
    out: str | None = None,
    tables: Sequence[str] = schemas.TABLES,
    run_id: str = "export",
) -> dict[str, str]:
    """Export ``tables`` of the store at ``root`` to ``out`` (default: ``root`` itself); returns
    ``{table: uri}`` of each exported table (tables the store lacks are skipped)."""
    import pyarrow.parquet as pq

    store = Store(root, storage_options)
    out = (out or root).rstrip("/")
    fs, _ = open_uri(out, dict(storage_options or {}))
    done: dict[str, str] = {}
    for name in tables:
        ds = store.open(name)
        if ds is None:
            continue
        final = join(out, f"{name}.parquet")
        staging = join(out, f".staging-{run_id}/{name}.parquet")
        _, staging_path = open_uri(staging, dict(storage_options or {}))
        fs.makedirs(staging_path, exist_ok=True)
        part, rows, writer = 0, 0, None
        try:
            for batch in ds.to_batches(batch_size=8192):
                if writer is None or rows >= ROWS_PER_FILE:
                    if writer is not None:
                        writer.close()
                    f = fs.open(f"{staging_path}/part-{part:05d}.parquet", "wb")
                    writer = pq.ParquetWriter(f, ds.schema)
                    writer.f = f  # keep the file open until the writer closes
                    part, rows = part + 1, 0
                writer.write_batch(batch)
                rows += batch.num_rows
            if writer is None:  # an empty table still exports its schema
                f = fs.open(f"{staging_path}/part-00000.parquet", "wb")
                writer = pq.ParquetWriter(f, ds.schema)
                writer.f = f
        finally:
            if writer is not None:
                writer.close()
                writer.f.close()
        _swap(fs, staging_path, open_uri(final, dict(storage_options or {}))[1])
        done[name] = final
    return done


def _swap(fs: Any, staging: str, final: str) -> None:
    """Replace ``final`` by ``staging`` (the old export is kept aside until the new one is in)."""
    old = final + ".old"
    if fs.exists(old):
        fs.rm(old, recursive=True)
    if fs.exists(final):
        fs.mv(final, old, recursive=True)
    fs.mv(staging, final, recursive=True)
    if fs.exists(old):
        fs.rm(old, recursive=True)
    parent = staging.rsplit("/", 1)[0]
    if fs.exists(parent) and not fs.ls(parent):
        fs.rm(parent, recursive=True)
