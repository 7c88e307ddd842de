"""Catalog readers: CSV/TSV, Parquet, JSON lines (optionally compressed) or a listed directory / prefix.

A *catalog* is either a table with a required ``uri`` column, an optional ``track_id`` column
and any metadata columns, or a directory / object prefix that is listed recursively for audio
files. Catalogs are read in a streaming fashion (:func:`iter_catalog`), so memory beyond the
caller's list of entries stays bounded. Every URI passes the :class:`pipeline.io.uris.UriPolicy`;
rows that fail become :class:`RejectedRow` and are never read.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.errors import (
    CatalogError,
    DuplicateTrackId,
    FetchError,
    PipelineError,
    UriRefused,
    error_type,
    redact,
)
from pipeline.io.objects import object_info, open_uri, scrub, with_retries
from pipeline.io.uris import (
    AUDIO_EXTENSIONS,
    CONTROL_RE,
    MAX_TRACK_ID_CHARS,
    MAX_URI_CHARS,
    TABLE_EXTENSIONS,
    UriPolicy,
    catalog_base,
    catalog_ext,
    has_dotdot,
    id_of_normalized,
    is_local_scheme,
    normalize_uri,
    resolve_uri,
    split_scheme,
)
from pipeline.schemas import RESERVED_COLUMNS, parse_layer_column

__all__ = [
    "VERSION_COLUMNS",
    "CatalogEntry",
    "CatalogPart",
    "CatalogSource",
    "FirstRowWins",
    "RejectedRow",
    "catalog_entry",
    "catalog_parts",
    "catalog_version",
    "iter_catalog",
    "iter_part",
    "open_catalog",
    "read_catalog",
]

# Catalog columns the pipeline keeps under their own name; other reserved names are renamed.
_KEPT_COLUMNS = frozenset({"track_id", "uri"})
_JSON_ARRAY_MAX_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class CatalogEntry:
    """One track to embed.

    Attributes:
        track_id: the catalog's ``track_id`` or :func:`stable_track_id` of the uri.
        uri: normalized absolute location (plain absolute path for local files).
        metadata: the other catalog columns as strings (``None`` for missing values); reserved
            names are prefixed ``catalog_`` (see :func:`iter_catalog`).
        content_version: the object's version as the catalog states it (:func:`catalog_version`),
            or ``None`` when the catalog has no version columns (or the row leaves them empty).
    """

    track_id: str
    uri: str
    metadata: dict[str, str | None] = field(default_factory=dict)
    content_version: str | None = None


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


#: Catalog columns that state an object's version, by precedence (output names: ``content_version``
#: is reserved, so it arrives as ``catalog_content_version``). ``size`` counts only with a time.
VERSION_COLUMNS = ("content_version", "etag", "size", "mtime", "updated_at")


def catalog_version(rec: dict[str, str | None]) -> str | None:
    """The object version a catalog row states, trusted instead of asking object storage:

    * ``content_version``: used as written (stripped);
    * else ``etag``: quotes and a ``W/`` prefix stripped, as object metadata gives it;
    * else ``size`` with ``mtime`` (else ``updated_at``): ``f"{size}-{mtime}"``, both as the
      catalog writes them (strings; a Parquet integer or timestamp in its Arrow string form).

    The value only has to change whenever the audio changes and stay the same otherwise: keep
    what the catalog writes stable (a re-export that reformats ``mtime`` re-embeds everything).
    ``None`` when the row has none of these (or they are empty).
    """

    def get(name: str) -> str | None:
        v = rec.get(f"catalog_{name}" if name == "content_version" else name)
        v = v.strip() if isinstance(v, str) else None
        return v or None

    if (v := get("content_version")) is not None:
        return v
    if (v := get("etag")) is not None:
        v = v[2:] if v.startswith("W/") else v
        return v.strip('"') or None
    size, when = get("size"), get("mtime") or get("updated_at")
    if size is not None and when is not None:
        return f"{size}-{when}"
    return None


def _metadata_name(name: str) -> str:
    """Output name of a catalog column: reserved names and ``layer_<n>`` get ``catalog_``."""
    if name in _KEPT_COLUMNS:
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
    out = [_metadata_name(n) for n in stripped]
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


_Row = tuple[int, "dict[str, str | None] | RejectedRow"]


def duplicate_message(track_id: str, first_row: int | str) -> str:
    """The reason of a :class:`DuplicateTrackId` rejection."""
    return f"duplicate track_id {track_id!r}: first used at row {first_row}, which wins"


class FirstRowWins:
    """The duplicate ``track_id`` policy, the only one: rows are shown in catalog order; the first
    row of an id wins, a later row of it is rejected (:class:`DuplicateTrackId`). The streaming
    reader (:func:`iter_catalog`) and the refresh plan (:func:`pipeline.runs.decide.decide`, per
    hash partition, every row of an id together) both ask it."""

    def __init__(self) -> None:
        self._first: dict[str, int] = {}

    def check(self, track_id: str, row: int) -> DuplicateTrackId | None:
        """``None`` for the first row of ``track_id`` (its ``row`` is remembered for the message
        of later ones), else the rejection."""
        first = self._first.get(track_id)
        if first is None:
            self._first[track_id] = row
            return None
        return DuplicateTrackId(duplicate_message(track_id, first))


def _reject(ix: int, exc: PipelineError, track_id: str | None = None, uri: str | None = None) -> RejectedRow:
    if uri is not None:
        uri = redact(uri if len(uri) <= MAX_URI_CHARS else uri[:MAX_URI_CHARS])
    return RejectedRow(row=ix, track_id=track_id, uri=uri, error_type=error_type(exc), message=str(exc))


def _iter_csv(
    fs: fsspec.AbstractFileSystem, path: str, where: str, delimiter: str, max_row_chars: int
) -> Iterator[_Row]:
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


def _csv_rows(reader: Any, invalid: list[Any], out_names: list[str], where: str) -> Iterator[_Row]:
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
                _reject(
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


def _iter_parquet(
    fs: fsspec.AbstractFileSystem,
    path: str,
    where: str,
    row_groups: tuple[int, ...] | None = None,
    first_row: int = 0,
) -> Iterator[_Row]:
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
        return _reject(ix, CatalogError(f"{where_line} is not a JSON object"))
    rec: dict[str, str | None] = {}
    for k, v in obj.items():
        name = _metadata_name(str(k).strip())
        if name in rec:
            return _reject(
                ix, CatalogError(f"{where_line}: field '{k}' collides with another field after renaming")
            )
        rec[name] = _json_value(v)
    return rec


def _iter_jsonl(fs: fsspec.AbstractFileSystem, path: str, where: str, max_row_chars: int) -> Iterator[_Row]:
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
                yield ix, _reject(ix, CatalogError(too_long(lineno)))
                continue
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                ix += 1
                yield ix, _reject(ix, CatalogError(f"line {lineno} is not valid UTF-8"))
                continue
            if not text:
                continue
            ix += 1
            if len(text) > max_row_chars:
                yield ix, _reject(ix, CatalogError(too_long(lineno)))
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                yield ix, _reject(ix, CatalogError(f"invalid JSON on line {lineno}: {e}"))
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


def _iter_listing(
    fs: fsspec.AbstractFileSystem, path: str, scheme: str | None, top_only: bool = False
) -> Iterator[_Row]:
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


def catalog_entry(
    ix: int,
    rec: dict[str, str | None],
    base: str,
    policy: UriPolicy,
    max_row_chars: int,
    duplicates: FirstRowWins | None = None,
) -> CatalogEntry | RejectedRow:
    """One catalog record (column name -> string value) checked and turned into an entry: the
    row-size limit, the URI policy (relative refs resolved against ``base``), the track id (the
    catalog's, else the uri's stable id). ``duplicates`` applies the duplicate policy here;
    without it the caller applies it (the refresh plan does, per hash partition)."""
    ref = rec.get("uri")
    tid_raw = rec.get("track_id")
    tid = tid_raw.strip() if isinstance(tid_raw, str) and tid_raw.strip() else None
    size = sum(len(k) + len(v) for k, v in rec.items() if v)
    if size > max_row_chars:
        return _reject(
            ix, CatalogError(f"row is {size} characters, over the limit of {max_row_chars}"), tid, None
        )
    if ref is None or not ref.strip():
        return _reject(ix, CatalogError("empty uri"), tid, ref)
    try:
        if len(ref) > MAX_URI_CHARS:
            raise UriRefused(f"uri is {len(ref)} characters, over the limit of {MAX_URI_CHARS}")
        if "\x00" in ref:
            raise UriRefused("uri contains a NUL byte")
        uri = policy.check(resolve_uri(ref, base), _normalized=True)
    except UriRefused as e:
        msg = str(e)
        if has_dotdot(ref) and not msg.startswith("path traversal"):
            msg = f"path traversal: {msg}"
        return _reject(ix, UriRefused(f"{msg} (catalog value {ref[:256]!r})"), tid, ref)
    if tid is None:
        tid = id_of_normalized(uri)
    elif len(tid) > MAX_TRACK_ID_CHARS or CONTROL_RE.search(tid):
        return _reject(
            ix,
            CatalogError(f"invalid track_id (over {MAX_TRACK_ID_CHARS} characters or control characters)"),
            None,
            uri,
        )
    if duplicates is not None and (dup := duplicates.check(tid, ix)) is not None:
        return _reject(ix, dup, tid, uri)
    meta = {k: v for k, v in rec.items() if k not in _KEPT_COLUMNS}
    return CatalogEntry(track_id=tid, uri=uri, metadata=meta, content_version=catalog_version(rec))


@dataclass(frozen=True)
class CatalogSource:
    """An opened catalog: where it is and how to read it (picklable: no filesystem held, so a
    Ray read task can take it). Made by :func:`open_catalog`."""

    uri: str  # normalized catalog uri
    where: str  # redacted, for messages
    path: str  # the fsspec path
    scheme: str | None  # the object-store scheme of a listing (None: local)
    is_dir: bool  # a directory / prefix listed for audio files
    base: str  # relative refs resolve against it; the default URI policy's prefix
    fmt: str | None  # csv / tsv / parquet / jsonl (None for a listing)
    storage_options: dict | None = None

    def fs(self) -> fsspec.AbstractFileSystem:
        return open_uri(self.uri, self.storage_options)[0]


@dataclass(frozen=True)
class CatalogPart:
    """A piece of a catalog that one reader streams on its own, in catalog order by ``ix``:
    the whole table; a run of a Parquet file's row groups (``row_groups``, first row
    ``first_row``); a listing's files directly under ``path`` (``top_only``) or one
    sub-directory / sub-prefix walked recursively. ``path=None`` with no row groups: everything."""

    ix: int = 0
    path: str | None = None
    top_only: bool = False
    row_groups: tuple[int, ...] | None = None
    first_row: int = 0


def open_catalog(catalog_uri: str, storage_options: dict | None = None) -> CatalogSource:
    """Check that the catalog exists and say how to read it.

    Raises:
        CatalogError: missing, unreadable, refused uri or unknown format (one line).
    """
    if isinstance(catalog_uri, os.PathLike):
        catalog_uri = os.fspath(catalog_uri)
    where = redact(str(catalog_uri))
    if not isinstance(catalog_uri, str) or not catalog_uri.strip():
        raise CatalogError("empty catalog uri")
    try:
        scheme, _ = split_scheme(catalog_uri)
        cat = normalize_uri(catalog_uri.strip())
        fs, path = open_uri(cat, storage_options)
        info = with_retries(lambda: object_info(fs, path), where, storage_options=storage_options)
    except FetchError as e:
        msg = str(e)
        if msg.startswith("not found"):
            raise CatalogError(f"catalog not found: {where}") from None
        raise CatalogError(f"cannot open catalog: {msg}") from None
    except UriRefused as e:
        raise CatalogError(f"bad catalog uri: {e}") from None
    is_dir = info.get("type") == "directory"
    fmt = None
    if not is_dir:
        ext = catalog_ext(cat)
        if ext is None:
            raise CatalogError(
                f"{where}: unknown catalog format (expected .csv, .tsv, .parquet, .jsonl, .json or a directory)"
            )
        fmt = TABLE_EXTENSIONS[ext]
    listing_scheme = None if is_local_scheme(scheme) else split_scheme(cat)[0]
    return CatalogSource(cat, where, path, listing_scheme, is_dir, catalog_base(cat, is_dir), fmt,
                         storage_options)  # fmt: skip


def catalog_parts(src: CatalogSource, rows_per_part: int = 1_000_000) -> list[CatalogPart]:
    """How a catalog splits into parts read side by side (:func:`iter_part`), in catalog order:
    a listing by its top-level sub-directories / sub-prefixes (one LIST here), a Parquet file by
    runs of row groups of about ``rows_per_part`` rows (its footer is read here); a CSV or JSON
    lines file is one part (it cannot be split without reading it)."""
    if src.is_dir:
        fs = src.fs()
        parts = [CatalogPart(0, src.path, top_only=True)]
        for sub in _subdirs(fs, src.path, src.scheme is None):
            parts.append(CatalogPart(len(parts), sub))
        return parts
    if src.fmt != "parquet":
        return [CatalogPart()]
    import pyarrow as pa
    import pyarrow.parquet as pq

    with src.fs().open(src.path, "rb") as f:
        try:
            meta = pq.ParquetFile(f, pre_buffer=False).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise CatalogError(f"{src.where}: not a readable Parquet file: {e}") from None
    parts: list[CatalogPart] = []
    groups: list[int] = []
    first = rows = 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= rows_per_part:
            parts.append(CatalogPart(len(parts), row_groups=tuple(groups), first_row=first))
            first, rows, groups = first + rows, 0, []
    if groups or not parts:
        parts.append(CatalogPart(len(parts), row_groups=tuple(groups), first_row=first))
    return parts


def _subdirs(fs: fsspec.AbstractFileSystem, path: str, local: bool) -> list[str]:
    """Sub-directories of ``path`` as the listing walks them (sorted, hidden names and local
    symlinked directories skipped)."""
    if local:
        with os.scandir(path) as it:
            return sorted(d.path for d in it
                          if not d.name.startswith(".") and d.is_dir() and not d.is_symlink())  # fmt: skip
    out = []
    for e in fs.ls(path, detail=True):
        name = str(e["name"]).rstrip("/")
        if e.get("type") == "directory" and not name.rsplit("/", 1)[-1].startswith("."):
            out.append(name)
    return sorted(out)


def iter_part(src: CatalogSource, part: CatalogPart, max_row_chars: int = 65536) -> Iterator[_Row]:
    """Raw records of one part: ``(row, record | RejectedRow)``, ``row`` counted within the
    catalog (Parquet) or within the part (a listing's part, a whole table). Records are column
    name -> string; :func:`catalog_entry` checks them."""
    fs = src.fs()
    if src.is_dir:
        rows: Iterator[_Row] = _iter_listing(fs, part.path or src.path, src.scheme, top_only=part.top_only)
    elif src.fmt in ("csv", "tsv"):
        rows = _iter_csv(fs, src.path, src.where, "," if src.fmt == "csv" else "\t", max_row_chars)
    elif src.fmt == "parquet":
        rows = _iter_parquet(fs, src.path, src.where, part.row_groups, part.first_row)
    else:
        rows = _iter_jsonl(fs, src.path, src.where, max_row_chars)
    try:
        yield from rows
    except PipelineError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CatalogError(
            scrub(f"{src.where}: cannot read catalog: {type(e).__name__}: {e}", src.storage_options)
        ) from None
    except Exception as e:
        if type(e).__module__.startswith("pyarrow"):
            raise CatalogError(scrub(f"{src.where}: cannot read catalog: {e}", src.storage_options)) from None
        raise
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()


def iter_catalog(
    catalog_uri: str,
    storage_options: dict | None = None,
    limit: int | None = None,
    policy: UriPolicy | None = None,
    max_row_chars: int = 65536,
) -> Iterator[CatalogEntry | RejectedRow]:
    """Stream a catalog: one :class:`CatalogEntry` or :class:`RejectedRow` per row, in order.

    Args:
        catalog_uri: local path, ``file://`` or object-store URI of a table (``.csv``, ``.tsv``,
            ``.parquet``/``.pq``, ``.jsonl``/``.ndjson``/``.json``, each optionally ``.gz``) or of
            a directory/prefix listed recursively for audio files (:data:`AUDIO_EXTENSIONS`,
            sorted, hidden names skipped, local symlinked directories not followed).
        storage_options: fsspec options (see :func:`open_uri`).
        limit: stop after this many *entries* (rejected rows do not count).
        policy: the URI policy; default: the catalog's own directory/prefix.
        max_row_chars: rows with more characters (names + values) are rejected.

    Tables need a ``uri`` column (else :class:`CatalogError`); ``track_id`` is optional
    (missing/empty -> :func:`stable_track_id`). Every other column becomes metadata, values as
    strings (``None`` for missing); reserved names (``pipeline.schemas.RESERVED_COLUMNS`` other
    than ``track_id``/``uri``, and ``layer_<n>``) are renamed ``catalog_<name>``. Relative uris
    resolve against the catalog's directory/prefix. A repeated ``track_id`` keeps the first
    row; later ones are rejected (:class:`DuplicateTrackId`). The same uri under different ids
    is allowed. Rows with an empty, overlong or refused uri are rejected, never read.
    Version columns (``content_version``, ``etag``, ``size`` + ``mtime``/``updated_at``) also give
    the entry's ``content_version`` (:func:`catalog_version`); they stay metadata as well.

    Raises:
        CatalogError: the catalog is missing, unreadable, of unknown format, or has no ``uri``
            column / duplicate column names.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit == 0:
        return
    src = open_catalog(catalog_uri, storage_options)
    if policy is None:
        policy = UriPolicy(allowed_prefixes=(src.base,))
    duplicates = FirstRowWins()
    n_ok = 0
    for ix, rec in iter_part(src, CatalogPart(), max_row_chars):
        if isinstance(rec, RejectedRow):
            yield rec
            continue
        out = catalog_entry(ix, rec, src.base, policy, max_row_chars, duplicates)
        yield out
        if isinstance(out, CatalogEntry):
            n_ok += 1
            if limit is not None and n_ok >= limit:
                return


def read_catalog(
    catalog_uri: str,
    storage_options: dict | None = None,
    limit: int | None = None,
    policy: UriPolicy | None = None,
    max_row_chars: int = 65536,
) -> tuple[list[CatalogEntry], list[RejectedRow]]:
    """Read a whole catalog: ``(entries, rejected)``, both in catalog order.

    See :func:`iter_catalog` for formats, columns, URI policy and duplicate handling.
    """
    entries: list[CatalogEntry] = []
    rejected: list[RejectedRow] = []
    for item in iter_catalog(catalog_uri, storage_options, limit, policy, max_row_chars):
        (entries if isinstance(item, CatalogEntry) else rejected).append(item)
    return entries, rejected
