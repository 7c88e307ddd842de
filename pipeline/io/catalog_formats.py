"""Catalog format readers: the raw records of a CSV/TSV, Parquet or JSON lines table (optionally
compressed) or of a directory / prefix listing.

Each reader yields ``(row, record | RejectedRow)``: a record maps output column names (reserved
names renamed ``catalog_<name>``, :func:`metadata_name`) to strings. Checking a record (URI policy,
track id, duplicates) is :func:`pipeline.io.catalog.catalog_entry`'s job; reading a catalog as a
whole is :func:`pipeline.io.catalog.iter_part`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.errors import CatalogError, PipelineError, error_type, redact
from pipeline.io.uris import AUDIO_EXTENSIONS, MAX_URI_CHARS, is_local_scheme
from pipeline.schemas import RESERVED_COLUMNS, parse_layer_column

__all__ = [
    "KEPT_COLUMNS",
    "CatalogRow",
    "RejectedRow",
    "iter_csv",
    "iter_jsonl",
    "iter_listing",
    "iter_parquet",
    "metadata_name",
    "reject_row",
]

# Catalog columns the pipeline keeps under their own name; other reserved names are renamed.
KEPT_COLUMNS = frozenset({"track_id", "uri"})
_JSON_ARRAY_MAX_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class RejectedRow:
    """A catalog row that will not be read.

    Attributes:
        row: 0-based index of the row among the catalog's data rows (files, for a listing).
        track_id: the row's track id if known.
        uri: the row's uri as written (redacted, cut to :data:`MAX_URI_CHARS`), if any.
        error_type: exception class name (``UriRefused``, ``CatalogError``, ``DuplicateTrackId``).
        message: one-line redacted reason.
    """

    row: int
    track_id: str | None
    uri: str | None
    error_type: str
    message: str


def metadata_name(name: str) -> str:
    """Output name of a catalog column: reserved names and ``layer_<n>`` get ``catalog_``."""
    if name in KEPT_COLUMNS:
        return name
    if name in RESERVED_COLUMNS or parse_layer_column(name) is not None:
        return f"catalog_{name}"
    return name


def _column_plan(names: list[str], where: str) -> list[str]:
    """Validate catalog column names; return their output names (same order)."""
    stripped = [str(n).strip() for n in names]
    if any(not n for n in stripped):
        raise CatalogError(f"{where}: empty column name in header")
    if len(set(stripped)) != len(stripped):
        dup = sorted({n for n in stripped if stripped.count(n) > 1})
        raise CatalogError(f"{where}: duplicate column names {dup}")
    if "uri" not in stripped:
        shown = ", ".join(stripped[:20])
        raise CatalogError(f"{where}: catalog has no 'uri' column (columns: {shown})")
    out = [metadata_name(n) for n in stripped]
    if len(set(out)) != len(out):
        clash = sorted({n for n in out if out.count(n) > 1})
        raise CatalogError(f"{where}: renaming reserved columns collides with existing columns {clash}")
    return out


def _json_value(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str)


def _arrow_to_strings(arr: Any) -> list[str | None]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr.to_pylist()
    if pa.types.is_boolean(t):
        return [None if v is None else ("true" if v else "false") for v in arr.to_pylist()]
    if not (pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        try:
            return pc.cast(arr, pa.string()).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    out: list[str | None] = []
    for v in arr.to_pylist():
        if isinstance(v, bytes):
            out.append(v.decode("utf-8", "replace"))
        else:
            out.append(_json_value(v))
    return out


CatalogRow = tuple[int, "dict[str, str | None] | RejectedRow"]


def reject_row(
    ix: int, exc: PipelineError, track_id: str | None = None, uri: str | None = None
) -> RejectedRow:
    """The :class:`RejectedRow` of row ``ix`` for ``exc`` (the uri redacted and cut)."""
    if uri is not None:
        uri = redact(uri if len(uri) <= MAX_URI_CHARS else uri[:MAX_URI_CHARS])
    return RejectedRow(row=ix, track_id=track_id, uri=uri, error_type=error_type(exc), message=str(exc))


def iter_csv(
    fs: fsspec.AbstractFileSystem, path: str, where: str, delimiter: str, max_row_chars: int
) -> Iterator[CatalogRow]:
    """Records of a CSV (``delimiter=","``) or TSV file, every value a string; an unparsable
    row becomes a :class:`RejectedRow`."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    invalid: list[Any] = []

    def on_invalid(row: Any) -> str:
        invalid.append(row)
        return "skip"

    # pyarrow reads ahead a fixed number of blocks (~35 measured), so the block size bounds memory;
    # a block must hold the longest accepted row (max_row_chars characters, <= 4 bytes each)
    block = max(64 * 1024, 4 * max_row_chars + 4096)
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True, invalid_row_handler=on_invalid)
    # Column names from the header line, read through its own handle: a pyarrow streaming reader
    # reads ahead in a background thread, so two readers must never share one file object.
    with fs.open(path, "rb", compression="infer") as f:
        head = f.read(block)
    nl = head.find(b"\n")
    header = head if nl < 0 else head[: nl + 1]
    if not header.strip(b"\r\n\t \xef\xbb\xbf"):
        raise CatalogError(f"{where}: catalog is empty (no header)")
    if nl < 0 and len(head) >= block:
        raise CatalogError(f"{where}: CSV header line is over {block} bytes")
    try:
        names = pacsv.read_csv(
            io.BytesIO(header),
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
        ).column_names
    except pa.ArrowInvalid as e:
        raise CatalogError(f"{where}: cannot parse CSV header: {e}") from None
    out_names = _column_plan(list(names), where)
    with fs.open(path, "rb", compression="infer") as f:
        invalid.clear()
        convert = pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
            null_values=[""],
        )
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=block, use_threads=False),
            parse_options=parse,
            convert_options=convert,
        )
        try:
            yield from _csv_rows(reader, invalid, out_names, where)
        finally:
            reader.close()  # stop the read-ahead before the file closes


def _csv_rows(reader: Any, invalid: list[Any], out_names: list[str], where: str) -> Iterator[CatalogRow]:
    import pyarrow as pa

    ix = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            batch = None
        except pa.ArrowInvalid as e:
            msg = str(e)
            if "straddle" in msg:
                msg = "a row is longer than the read block; raise max_row_chars"
            raise CatalogError(f"{where}: CSV parse error after row {ix}: {msg}") from None
        for bad in invalid:
            line = f" line {bad.number}" if getattr(bad, "number", None) else ""
            yield (
                ix,
                reject_row(
                    ix,
                    CatalogError(
                        f"unparsable CSV row{line}: expected {bad.expected_columns} columns, got {bad.actual_columns}"
                    ),
                ),
            )
            ix += 1
        invalid.clear()
        if batch is None:
            return
        cols = [_arrow_to_strings(batch.column(i)) for i in range(batch.num_columns)]
        for r in range(batch.num_rows):
            yield ix, {out_names[c]: cols[c][r] for c in range(len(out_names))}
            ix += 1


# rows turned into Python strings at a time: a limited read (`--limit`) converts at most this many
_PARQUET_BATCH_ROWS = 1024


def iter_parquet(
    fs: fsspec.AbstractFileSystem,
    path: str,
    where: str,
    row_groups: tuple[int, ...] | None = None,
    first_row: int = 0,
) -> Iterator[CatalogRow]:
    """Records of a Parquet file (its ``row_groups`` only, rows counted from ``first_row``),
    values as strings (nested values as JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f, pre_buffer=False)  # pre_buffer would read every row group at once
        except (pa.ArrowInvalid, OSError) as e:
            raise CatalogError(f"{where}: not a readable Parquet file: {e}") from None
        names = list(pf.schema_arrow.names)
        out_names = _column_plan(names, where)
        ix = first_row
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=row_groups):
            cols = [_arrow_to_strings(batch.column(i)) for i in range(batch.num_columns)]
            for r in range(batch.num_rows):
                yield ix, {out_names[c]: cols[c][r] for c in range(len(out_names))}
                ix += 1


def _json_record(obj: Any, ix: int, where_line: str) -> dict[str, str | None] | RejectedRow:
    if not isinstance(obj, dict):
        return reject_row(ix, CatalogError(f"{where_line} is not a JSON object"))
    rec: dict[str, str | None] = {}
    for k, v in obj.items():
        name = metadata_name(str(k).strip())
        if name in rec:
            return reject_row(
                ix, CatalogError(f"{where_line}: field '{k}' collides with another field after renaming")
            )
        rec[name] = _json_value(v)
    return rec


def iter_jsonl(
    fs: fsspec.AbstractFileSystem, path: str, where: str, max_row_chars: int
) -> Iterator[CatalogRow]:
    """Records of a JSON lines file (or a small JSON array); a line over ``max_row_chars``, not
    UTF-8, not JSON or not an object becomes a :class:`RejectedRow`."""
    byte_limit = 4 * max_row_chars + 2
    checked = False

    def check_first(rec: dict[str, str | None] | RejectedRow) -> None:
        nonlocal checked
        if checked or isinstance(rec, RejectedRow):
            return
        checked = True
        if "uri" not in rec:
            shown = ", ".join(list(rec)[:20])
            raise CatalogError(f"{where}: catalog has no 'uri' field (first record's fields: {shown})")

    with fs.open(path, "rb", compression="infer") as f:
        head = f.read(64)
        first = head.lstrip()[:1]
        f.seek(0)
        if first == b"[":  # a JSON array: small ones are accepted
            size = fs.size(path) or 0
            if size > _JSON_ARRAY_MAX_BYTES:
                raise CatalogError(
                    f"{where}: JSON array catalogs over {_JSON_ARRAY_MAX_BYTES} bytes; use JSON lines"
                )
            try:
                arr = json.loads(f.read().decode("utf-8-sig"))
            except (ValueError, UnicodeDecodeError) as e:
                raise CatalogError(f"{where}: invalid JSON: {e}") from None
            for ix, obj in enumerate(arr):
                rec = _json_record(obj, ix, f"item {ix}")
                check_first(rec)
                yield ix, rec
            return
        ix = -1

        def too_long(lineno: int) -> str:
            return f"line {lineno} is over the {max_row_chars}-character row limit"

        for lineno, raw in enumerate(_iter_lines(f, byte_limit), start=1):
            if raw is None:
                ix += 1
                yield ix, reject_row(ix, CatalogError(too_long(lineno)))
                continue
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                ix += 1
                yield ix, reject_row(ix, CatalogError(f"line {lineno} is not valid UTF-8"))
                continue
            if not text:
                continue
            ix += 1
            if len(text) > max_row_chars:
                yield ix, reject_row(ix, CatalogError(too_long(lineno)))
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                yield ix, reject_row(ix, CatalogError(f"invalid JSON on line {lineno}: {e}"))
                continue
            rec = _json_record(obj, ix, f"line {lineno}")
            check_first(rec)
            yield ix, rec


def _iter_lines(f: Any, byte_limit: int, chunk_size: int = 1 << 20) -> Iterator[bytes | None]:
    """Lines of a binary file (without the newline), read in chunks; a line longer than
    ``byte_limit`` bytes is skipped and reported as ``None``, so memory stays bounded."""
    buf = b""
    overlong = False
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        buf += chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if overlong:
                yield None
                overlong = False
            else:
                yield buf[start:nl]
            start = nl + 1
        buf = buf[start:]
        if len(buf) > byte_limit:
            overlong = True
            buf = b""
    if overlong:
        yield None
    elif buf:
        yield buf


def iter_listing(
    fs: fsspec.AbstractFileSystem, path: str, scheme: str | None, top_only: bool = False
) -> Iterator[CatalogRow]:
    """Audio files under a directory/prefix, sorted, hidden names skipped, symlinks not followed;
    ``top_only``: only the files directly under it."""
    ix = 0
    if is_local_scheme(scheme):
        for root, dirs, files in os.walk(path, followlinks=False):
            dirs[:] = [] if top_only else sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.lower().endswith(AUDIO_EXTENSIONS):
                    continue
                yield ix, {"uri": os.path.join(root, name)}
                ix += 1
        return
    for root, dirs, files in fs.walk(path, maxdepth=1 if top_only else None):
        dirs[:] = [] if top_only else sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(AUDIO_EXTENSIONS):
                continue
            yield ix, {"uri": f"{scheme}://{root.rstrip('/')}/{name}"}
            ix += 1
