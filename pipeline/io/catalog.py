"""Catalog readers: CSV/TSV, Parquet, JSON lines (optionally compressed) or a listed directory / prefix.

A *catalog* is either a table with a required ``uri`` column, an optional ``track_id`` column
and any metadata columns, or a directory / object prefix that is listed recursively for audio
files. Catalogs are read in a streaming fashion (:func:`iter_catalog`), so memory beyond the
caller's list of entries stays bounded. Every URI passes the :class:`pipeline.io.uris.UriPolicy`;
rows that fail become :class:`RejectedRow` and are never read. The per-format readers of raw
records live in :mod:`pipeline.io.catalog_formats`; this module opens, splits and checks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from pipeline.errors import (
    CatalogError,
    DuplicateTrackId,
    FetchError,
    PipelineError,
    UriRefused,
    redact,
)
from pipeline.io.catalog_formats import (
    KEPT_COLUMNS,
    CatalogRow,
    RejectedRow,
    iter_csv,
    iter_jsonl,
    iter_listing,
    iter_parquet,
    reject_row,
)
from pipeline.io.objects import object_info, open_uri, scrub, with_retries
from pipeline.io.uris import (
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


#: Catalog columns that state an object's version, by precedence (output names: ``content_version``
#: is reserved, so it arrives as ``catalog_content_version``). ``size`` counts only with a time.
#: Longest catalog row accepted (characters); longer rows are error rows (``--max-row-chars``).
MAX_ROW_CHARS = 65536

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
        return reject_row(
            ix, CatalogError(f"row is {size} characters, over the limit of {max_row_chars}"), tid, None
        )
    if ref is None or not ref.strip():
        return reject_row(ix, CatalogError("empty uri"), tid, ref)
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
        return reject_row(ix, UriRefused(f"{msg} (catalog value {ref[:256]!r})"), tid, ref)
    if tid is None:
        tid = id_of_normalized(uri)
    elif len(tid) > MAX_TRACK_ID_CHARS or CONTROL_RE.search(tid):
        return reject_row(
            ix,
            CatalogError(f"invalid track_id (over {MAX_TRACK_ID_CHARS} characters or control characters)"),
            None,
            uri,
        )
    if duplicates is not None and (dup := duplicates.check(tid, ix)) is not None:
        return reject_row(ix, dup, tid, uri)
    meta = {k: v for k, v in rec.items() if k not in KEPT_COLUMNS}
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


def iter_part(
    src: CatalogSource, part: CatalogPart, max_row_chars: int = MAX_ROW_CHARS
) -> Iterator[CatalogRow]:
    """Raw records of one part: ``(row, record | RejectedRow)``, ``row`` counted within the
    catalog (Parquet) or within the part (a listing's part, a whole table). Records are column
    name -> string; :func:`catalog_entry` checks them."""
    fs = src.fs()
    if src.is_dir:
        rows: Iterator[CatalogRow] = iter_listing(
            fs, part.path or src.path, src.scheme, top_only=part.top_only
        )
    elif src.fmt in ("csv", "tsv"):
        rows = iter_csv(fs, src.path, src.where, "," if src.fmt == "csv" else "\t", max_row_chars)
    elif src.fmt == "parquet":
        rows = iter_parquet(fs, src.path, src.where, part.row_groups, part.first_row)
    else:
        rows = iter_jsonl(fs, src.path, src.where, max_row_chars)
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
    max_row_chars: int = MAX_ROW_CHARS,
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
    max_row_chars: int = MAX_ROW_CHARS,
) -> tuple[list[CatalogEntry], list[RejectedRow]]:
    """Read a whole catalog: ``(entries, rejected)``, both in catalog order.

    See :func:`iter_catalog` for formats, columns, URI policy and duplicate handling.
    """
    entries: list[CatalogEntry] = []
    rejected: list[RejectedRow] = []
    for item in iter_catalog(catalog_uri, storage_options, limit, policy, max_row_chars):
        (entries if isinstance(item, CatalogEntry) else rejected).append(item)
    return entries, rejected
