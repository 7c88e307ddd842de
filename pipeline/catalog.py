"""Catalog reading, URI safety, stable track ids, content versions and fetching.

A *catalog* is either a table (CSV/TSV, Parquet, JSON lines; optionally ``.gz``) with a required
``uri`` column, an optional ``track_id`` column and any metadata columns, or a directory / object
prefix that is listed recursively for audio files. Catalogs are read in a streaming fashion
(:func:`iter_catalog`), so memory beyond the caller's list of entries stays bounded.

Every URI goes through a :class:`UriPolicy` before anything reads it: only allowed schemes,
only under allowed prefixes (by default the catalog's own directory or prefix), no ``..``
escapes, no local symlinks resolving outside, no NUL or control characters, at most
:data:`MAX_URI_CHARS` characters. Rows that fail become :class:`RejectedRow` and are never read.

URIs are normalized: local files become plain absolute paths (``file://`` accepted on input),
object-store URIs keep their scheme (``s3://bucket/key``; ``gcs://`` becomes ``gs://``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
from pipeline.schemas import RESERVED_COLUMNS, parse_layer_column

__all__ = [
    "AUDIO_EXTENSIONS",
    "MAX_URI_CHARS",
    "CatalogEntry",
    "RejectedRow",
    "UriPolicy",
    "normalize_uri",
    "resolve_uri",
    "stable_track_id",
    "iter_catalog",
    "read_catalog",
    "content_version",
    "open_uri",
    "fetch_bytes",
]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".oga", ".aif", ".aiff")
MAX_URI_CHARS = 4096
MAX_TRACK_ID_CHARS = 512
DEFAULT_MAX_BYTES = 2 * 1024**3

_TABLE_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
_COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst")
# Catalog columns the pipeline keeps under their own name; other reserved names are renamed.
_KEPT_COLUMNS = frozenset({"track_id", "uri"})
_JSON_ARRAY_MAX_BYTES = 64 * 1024**2

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogEntry:
    """One track to embed.

    Attributes:
        track_id: the catalog's ``track_id`` or :func:`stable_track_id` of the uri.
        uri: normalized absolute location (plain absolute path for local files).
        metadata: the other catalog columns as strings (``None`` for missing values); reserved
            names are prefixed ``catalog_`` (see :func:`iter_catalog`).
    """

    track_id: str
    uri: str
    metadata: dict[str, str | None] = field(default_factory=dict)


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


# ---------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------


def _split_scheme(uri: str) -> tuple[str | None, str]:
    """``"s3://b/k"`` -> ``("s3", "//b/k")``; ``"/a/b"`` -> ``(None, "/a/b")``."""
    m = _SCHEME_RE.match(uri)
    if not m:
        return None, uri
    return m.group(1).lower(), uri[m.end() :]


def _is_local_scheme(scheme: str | None) -> bool:
    return scheme is None or scheme in ("file", "local")


def _file_uri_to_path(rest: str) -> str:
    """The part after ``file:`` -> a local path (``//localhost/x``, ``///x``, ``/x``)."""
    if rest.startswith("//"):
        host, sep, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise UriRefused(f"file URI with a remote host '{host}' is not supported")
        return "/" + path if sep else "/"
    return rest


def normalize_uri(uri: str) -> str:
    """Normalize a URI or path without touching storage.

    * local paths and ``file://`` URIs -> ``os.path.normpath(os.path.abspath(path))``;
    * ``scheme://rest`` -> lower-case scheme (``gcs`` -> ``gs``), ``.``/``..``/``//`` collapsed
      with POSIX rules (a ``..`` can climb out of the bucket: the policy then refuses it), a
      trailing ``/`` kept (it marks a prefix);
    * other ``scheme:...`` forms (``data:``, ``mailto:``) -> returned with a lower-case scheme.
    """
    scheme, rest = _split_scheme(uri)
    if _is_local_scheme(scheme):
        path = _file_uri_to_path(rest) if scheme is not None else rest
        if not path:
            raise UriRefused("empty path")
        return os.path.normpath(os.path.abspath(path))
    assert scheme is not None
    if scheme == "gcs":
        scheme = "gs"
    if not rest.startswith("//"):
        return f"{scheme}:{rest}"
    body = rest[2:]
    trailing = body.endswith("/")
    norm = posixpath.normpath("/" + body).lstrip("/")
    if norm in ("", "."):
        norm = ""
    if trailing and norm:
        norm += "/"
    return f"{scheme}://{norm}"


def _has_dotdot(uri: str) -> bool:
    scheme, rest = _split_scheme(uri)
    return ".." in rest.replace("\\", "/").split("/")


def resolve_uri(ref: str, base_uri: str) -> str:
    """Resolve a catalog reference against the catalog's location.

    Args:
        ref: the catalog value: a relative path (``clips/a.ogg``), an absolute local path, a
            ``file://`` URI or any ``scheme://`` URI.
        base_uri: the catalog's location: a directory/prefix (an existing local directory, or
            anything ending in ``/``) or the catalog file itself (its parent is used).

    Returns:
        The normalized absolute URI (:func:`normalize_uri`); relative refs are joined to the
        base (``s3://bucket/music/`` + ``clips/a.ogg`` -> ``s3://bucket/music/clips/a.ogg``).
        Absolute paths and URIs are kept (normalized). Nothing is checked here: pass the result
        to :meth:`UriPolicy.check`.

    >>> resolve_uri("clips/a.ogg", "s3://bucket/music/catalog.csv")
    's3://bucket/music/clips/a.ogg'
    """
    if not isinstance(ref, str) or not ref.strip():
        raise UriRefused("empty uri")
    ref = ref.strip()
    scheme, _ = _split_scheme(ref)
    if scheme is not None or ref.startswith("/"):
        return normalize_uri(ref)
    bscheme, _ = _split_scheme(base_uri)
    if _is_local_scheme(bscheme):
        base = normalize_uri(base_uri)
        is_dir = base_uri.endswith("/") or os.path.isdir(base)
        base_dir = base if is_dir else os.path.dirname(base)
        return os.path.normpath(os.path.join(base_dir, ref))
    base = normalize_uri(base_uri)
    if not base.endswith("/"):
        head, _, tail = base.partition("://")
        base = f"{head}://{tail.rsplit('/', 1)[0]}/" if "/" in tail else f"{head}://{tail}/"
    return normalize_uri(base + ref)


def stable_track_id(uri: str) -> str:
    """Deterministic id of a URI: ``"t_"`` + the first 16 hex chars of sha1(normalized uri).

    ``/a/b.ogg``, ``file:///a/b.ogg`` and ``/a/./b.ogg`` give the same id.
    """
    return _id_of_normalized(normalize_uri(uri))


def _id_of_normalized(norm: str) -> str:
    return "t_" + hashlib.sha1(norm.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _under(path: str, prefix: str) -> bool:
    """``prefix`` ends with ``/``; true for the prefix directory itself and anything below it."""
    return path.startswith(prefix) or path == prefix.rstrip("/") or path + "/" == prefix


@dataclass(frozen=True)
class UriPolicy:
    """Which URIs the pipeline may read.

    Attributes:
        allowed_prefixes: directories / object prefixes (``/data/music``, ``s3://bucket/music/``,
            ``s3://`` for any bucket, ``/`` for any local file). Matching is per path component
            (``/data/music`` does not allow ``/data/music2``). An empty tuple allows nothing.
        allowed_schemes: URI schemes allowed; local paths count as ``file``.
    """

    allowed_prefixes: tuple[str, ...]
    allowed_schemes: tuple[str, ...] = ("file", "s3", "gs", "gcs")
    # derived in __post_init__: normalized prefixes (with trailing "/") and local realpaths
    _local: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    _local_real: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    _remote: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    # realpath of recently seen parent directories (bounded), so a catalog of 1M files in a few
    # folders costs one lstat per file instead of one per path component
    _dir_real: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.allowed_prefixes, str):
            raise TypeError("allowed_prefixes must be a tuple of strings, not a string")
        schemes = tuple(s.lower().rstrip(":/") for s in self.allowed_schemes)
        local: list[str] = []
        local_real: list[str] = []
        remote: list[str] = []
        for p in self.allowed_prefixes:
            if not isinstance(p, str) or not p.strip() or "\x00" in p:
                raise ValueError(f"invalid allowed prefix {p!r}")
            scheme, rest = _split_scheme(p)
            if _is_local_scheme(scheme):
                norm = normalize_uri(p)
                real = os.path.realpath(norm)
                local.append(norm.rstrip("/") + "/")
                local_real.append(real.rstrip("/") + "/")
            else:
                norm = normalize_uri(p)
                if norm.endswith(":"):  # "s3:" -> scheme only
                    norm += "//"
                remote.append(norm if norm.endswith("/") else norm + "/")
        object.__setattr__(self, "allowed_prefixes", tuple(self.allowed_prefixes))
        object.__setattr__(self, "allowed_schemes", schemes)
        object.__setattr__(self, "_local", tuple(local))
        object.__setattr__(self, "_local_real", tuple(local_real))
        object.__setattr__(self, "_remote", tuple(remote))

    @classmethod
    def for_catalog(cls, catalog_uri: str, extra_prefixes: tuple[str, ...] | list[str] = ()) -> UriPolicy:
        """The default policy of a catalog: its own directory (local) or prefix (object store).

        A local catalog that is a directory allows that directory; a catalog file allows its
        parent directory. For object stores, a URI ending in ``/`` or without a catalog file
        extension is taken as the prefix itself, otherwise its parent prefix is used.
        """
        return cls(allowed_prefixes=(_catalog_base(catalog_uri, None), *tuple(extra_prefixes)))

    def check(self, uri: str, *, _normalized: bool = False) -> str:
        """Return the normalized absolute ``uri`` if it may be read, else raise :class:`UriRefused`."""
        if not isinstance(uri, str):
            raise UriRefused(f"uri must be a string, got {type(uri).__name__}")
        if not uri.strip():
            raise UriRefused("empty uri")
        if len(uri) > MAX_URI_CHARS:
            raise UriRefused(f"uri is {len(uri)} characters, over the limit of {MAX_URI_CHARS}")
        if "\x00" in uri:
            raise UriRefused("uri contains a NUL byte")
        if _CONTROL_RE.search(uri):
            raise UriRefused("uri contains control characters")
        scheme, _ = _split_scheme(uri)
        kind = "file" if _is_local_scheme(scheme) else scheme
        if scheme is None and not uri.startswith("/"):
            raise UriRefused(f"not an absolute path or URI: {uri}")
        if kind not in self.allowed_schemes:
            raise UriRefused(f"scheme '{kind}' is not allowed (allowed: {', '.join(self.allowed_schemes)})")
        norm = uri if _normalized else normalize_uri(uri)
        traversal = "path traversal: " if _has_dotdot(uri) else ""
        if kind == "file":
            if not any(_under(norm, p) for p in (*self._local, *self._local_real)):
                raise UriRefused(f"{traversal}{norm} is outside the allowed prefixes")
            real = self._realpath(norm)
            if not any(_under(real, p) for p in self._local_real):
                raise UriRefused(f"symlink escape: {norm} resolves to {real}, outside the allowed prefixes")
            return norm
        if not any(_under(norm, p) for p in self._remote):
            raise UriRefused(f"{traversal}{norm} is outside the allowed prefixes")
        return norm

    def _realpath(self, norm: str) -> str:
        """``os.path.realpath(norm)`` with the parent directory's realpath cached."""
        parent, name = os.path.split(norm)
        real_parent = self._dir_real.get(parent)
        if real_parent is None:
            real_parent = os.path.realpath(parent)
            if len(self._dir_real) >= 4096:
                self._dir_real.clear()
            self._dir_real[parent] = real_parent
        path = os.path.join(real_parent, name)
        return os.path.realpath(path) if os.path.islink(path) else path


def _catalog_ext(uri: str) -> str | None:
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    for c in _COMPRESSION_EXTENSIONS:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    for ext in _TABLE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


def _catalog_base(catalog_uri: str, is_dir: bool | None) -> str:
    """The directory/prefix (with trailing ``/``) relative refs of a catalog resolve against."""
    scheme, _ = _split_scheme(catalog_uri)
    norm = normalize_uri(catalog_uri)
    if _is_local_scheme(scheme):
        if is_dir is None:
            is_dir = os.path.isdir(norm)
        d = norm if is_dir else os.path.dirname(norm)
        return d.rstrip("/") + "/"
    if is_dir is None:
        is_dir = norm.endswith("/") or _catalog_ext(norm) is None
    if is_dir:
        return norm if norm.endswith("/") else norm + "/"
    head, _, tail = norm.partition("://")
    return f"{head}://{tail.rsplit('/', 1)[0]}/" if "/" in tail else f"{head}://{tail}/"


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------


def _secret_values(storage_options: Mapping[str, Any] | None) -> list[str]:
    out: list[str] = []

    def walk(d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v)
            elif (
                isinstance(v, str)
                and len(v) >= 4
                and re.search(r"(?i)key|secret|token|password|credential", k)
            ):
                out.append(v)

    if storage_options:
        walk(storage_options)
    return out


def _scrub(text: str, storage_options: Mapping[str, Any] | None) -> str:
    for v in _secret_values(storage_options):
        text = text.replace(v, "***")
    return redact(text)


def _s3_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    so = dict(storage_options or {})
    ck = dict(so.get("client_kwargs") or {})
    if "region" in so:  # the pipeline's neutral key; s3fs wants client_kwargs.region_name
        ck.setdefault("region_name", so.pop("region"))
        so["client_kwargs"] = ck
    if "endpoint_url" not in so and "endpoint_url" not in ck:
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if ep:
            so["endpoint_url"] = ep
    return so


def open_uri(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path for ``uri`` (``fsspec.core.url_to_fs``).

    For ``s3://`` the endpoint comes from ``storage_options["endpoint_url"]`` (or
    ``client_kwargs.endpoint_url``), else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``;
    ``key``/``secret``/``token``/``client_kwargs`` are passed to s3fs as given. Local paths and
    ``file://`` URIs give the local filesystem.

    Raises:
        FetchError: no filesystem implementation for the scheme, or bad options.
    """
    scheme, _ = _split_scheme(uri)
    so: dict[str, Any] = dict(storage_options or {})
    if scheme in ("s3", "s3a"):
        so = _s3_options(so)
    if scheme == "gcs":
        uri = "gs" + uri[3:]
    try:
        fs, path = fsspec.core.url_to_fs(uri, **so)
    except ImportError as e:
        raise FetchError(_scrub(f"no filesystem for '{scheme}' URIs (missing package): {e}", so)) from None
    except (ValueError, TypeError) as e:
        raise FetchError(_scrub(f"cannot open {uri}: {e}", so)) from None
    return fs, path


_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientConnectorError",
        "ServerTimeoutError",
        "ProtocolError",
        "SlowDown",
        "Throttling",
        "ServiceUnavailable",
        "InternalError",
    }
)
_PERMANENT = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    PipelineError,
    ValueError,
    TypeError,
    KeyError,
)


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection/timeouts/5xx-like storage errors, not missing/denied/invalid."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, OSError)):
        return True
    if type(exc).__name__ in _TRANSIENT_NAMES:
        return True
    mod = type(exc).__module__ or ""
    return mod.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google")


_T = TypeVar("_T")


def _with_retries(
    fn: Callable[[], _T],
    what: str,
    tries: int = 3,
    backoff_s: float = 0.2,
    storage_options: Mapping[str, Any] | None = None,
) -> _T:
    """Call ``fn``; retry transient errors (:func:`_is_transient`) up to ``tries`` times in all,
    sleeping ``backoff_s * 2**i`` between tries. Permanent errors map to :class:`FetchError`
    at once (``not found``, ``is a directory``, ``access denied``)."""
    last: BaseException | None = None
    for i in range(max(1, tries)):
        try:
            return fn()
        except PipelineError:
            raise
        except FileNotFoundError:
            raise FetchError(f"not found: {what}") from None
        except (IsADirectoryError, NotADirectoryError):
            raise FetchError(f"is a directory, not a file: {what}") from None
        except PermissionError as e:
            raise FetchError(_scrub(f"access denied: {what}: {e}", storage_options)) from None
        except Exception as e:  # classified below
            if not _is_transient(e):
                raise FetchError(
                    _scrub(f"storage error on {what}: {type(e).__name__}: {e}", storage_options)
                ) from None
            last = e
            if i + 1 < tries:
                time.sleep(backoff_s * (2**i))
    assert last is not None
    raise FetchError(
        _scrub(
            f"storage error on {what} after {max(1, tries)} tries: {type(last).__name__}: {last}",
            storage_options,
        )
    )


def _info(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    with contextlib.suppress(Exception):  # cache invalidation is best effort
        fs.invalidate_cache(path)
    return fs.info(path)


def _version_from_info(info: Mapping[str, Any], fs: fsspec.AbstractFileSystem, path: str) -> str:
    etag = info.get("ETag") or info.get("etag") or info.get("e_tag")
    if etag:
        s = str(etag).strip()
        if s.startswith("W/"):
            s = s[2:]
        return s.strip('"')
    size = info.get("size")
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        try:
            st = os.stat(path)
            return f"{st.st_size}-{st.st_mtime_ns}"
        except OSError:
            pass
    mtime: Any = None
    for k in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        if info.get(k) is not None:
            mtime = info[k]
            break
    if isinstance(mtime, _dt.datetime):
        if mtime.tzinfo is None:
            mtime = mtime.replace(tzinfo=_dt.timezone.utc)
        mtime = f"{mtime.timestamp():.6f}"
    elif isinstance(mtime, str):
        mtime = mtime.strip()
    return f"{size}-{mtime}" if mtime is not None else f"{size}"


def content_version(
    uri: str, fs: fsspec.AbstractFileSystem | None = None, storage_options: dict | None = None
) -> str:
    """Version string of the object at ``uri`` from its metadata (nothing is downloaded).

    The ETag (quotes stripped) where the store has one (S3, GCS), else ``f"{size}-{mtime_ns}"``
    for local files and ``f"{size}-{mtime}"`` for other stores. Changes whenever the content
    is rewritten.

    Raises:
        FetchError: not found, or a storage error after retries.
    """
    if fs is None:
        fs, path = open_uri(uri, storage_options)
    else:
        path = fs._strip_protocol(uri)
    info = _with_retries(lambda: _info(fs, path), uri, storage_options=storage_options)
    return _version_from_info(info, fs, path)


def fetch_bytes(
    uri: str,
    storage_options: dict | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    tries: int = 3,
    backoff_s: float = 0.2,
) -> tuple[bytes, str]:
    """Download the whole object at ``uri``; returns ``(data, content_version)``.

    The size is checked from ``info()`` before reading, and the read itself is capped at
    ``max_bytes + 1`` bytes. Only regular files/objects are read (a FIFO is refused, not opened). Transient storage errors are retried
    (``tries`` attempts in all, backoff ``backoff_s * 2**i``); the version is taken from the
    same ``info()`` call as the size.

    Raises:
        FetchError: ``not found``, ``is a directory``, over ``max_bytes``, access denied, or a
            storage error after retries. Messages are redacted.
    """
    fs, path = open_uri(uri, storage_options)

    def attempt() -> tuple[bytes, str]:
        info = _info(fs, path)
        kind = info.get("type")
        if kind == "directory":
            raise FetchError(f"is a directory, not a file: {uri}")
        if kind not in (None, "file"):  # FIFOs, sockets, devices: reading could block forever
            raise FetchError(f"not a regular file ({kind}): {uri}")
        size = info.get("size")
        if size is not None and int(size) > max_bytes:
            raise FetchError(f"object is {int(size)} bytes, over the {max_bytes}-byte limit: {uri}")
        version = _version_from_info(info, fs, path)
        # capped read: an object that grew after info() still cannot exceed max_bytes + 1 in memory.
        # Capped at the known size too: a local read(n) allocates n bytes up front, and 2 GiB of
        # address space per file fails under RLIMIT_AS or strict overcommit.
        cap = max_bytes if size is None else min(max_bytes, int(size))
        data = fs.cat_file(path, start=0, end=cap + 1)
        if len(data) > max_bytes:
            raise FetchError(f"object is over the {max_bytes}-byte limit: {uri}")
        if size is not None and len(data) > int(size):
            raise FetchError(f"object changed while being read (now over {int(size)} bytes): {uri}")
        return bytes(data), version

    return _with_retries(attempt, uri, tries=tries, backoff_s=backoff_s, storage_options=storage_options)


# ---------------------------------------------------------------------------------------------
# catalog reading
# ---------------------------------------------------------------------------------------------


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


def _iter_parquet(fs: fsspec.AbstractFileSystem, path: str, where: str) -> Iterator[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f, pre_buffer=False)  # pre_buffer would read every row group at once
        except (pa.ArrowInvalid, OSError) as e:
            raise CatalogError(f"{where}: not a readable Parquet file: {e}") from None
        names = list(pf.schema_arrow.names)
        out_names = _column_plan(names, where)
        ix = 0
        for batch in pf.iter_batches(batch_size=8192):
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
        for lineno, raw in enumerate(_iter_lines(f, byte_limit), start=1):
            if raw is None:
                ix += 1
                yield (
                    ix,
                    _reject(
                        ix, CatalogError(f"line {lineno} is over the {max_row_chars}-character row limit")
                    ),
                )
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
                yield (
                    ix,
                    _reject(
                        ix, CatalogError(f"line {lineno} is over the {max_row_chars}-character row limit")
                    ),
                )
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


def _iter_listing(fs: fsspec.AbstractFileSystem, path: str, scheme: str | None) -> Iterator[_Row]:
    """Audio files under a directory/prefix, sorted, hidden names skipped, symlinks not followed."""
    ix = 0
    if _is_local_scheme(scheme):
        for root, dirs, files in os.walk(path, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.lower().endswith(AUDIO_EXTENSIONS):
                    continue
                yield ix, {"uri": os.path.join(root, name)}
                ix += 1
        return
    for root, dirs, files in fs.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(AUDIO_EXTENSIONS):
                continue
            yield ix, {"uri": f"{scheme}://{root.rstrip('/')}/{name}"}
            ix += 1


def _entry(
    ix: int,
    rec: dict[str, str | None],
    base: str,
    policy: UriPolicy,
    seen: dict[str, int],
    max_row_chars: int,
) -> CatalogEntry | RejectedRow:
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
        if _has_dotdot(ref) and not msg.startswith("path traversal"):
            msg = f"path traversal: {msg}"
        return _reject(ix, UriRefused(f"{msg} (catalog value {ref[:256]!r})"), tid, ref)
    if tid is None:
        tid = _id_of_normalized(uri)
    elif len(tid) > MAX_TRACK_ID_CHARS or _CONTROL_RE.search(tid):
        return _reject(
            ix,
            CatalogError(f"invalid track_id (over {MAX_TRACK_ID_CHARS} characters or control characters)"),
            None,
            uri,
        )
    first = seen.get(tid)
    if first is not None:
        return _reject(
            ix,
            DuplicateTrackId(f"duplicate track_id {tid!r}: first used at row {first}, which wins"),
            tid,
            uri,
        )
    seen[tid] = ix
    meta = {k: v for k, v in rec.items() if k not in _KEPT_COLUMNS}
    return CatalogEntry(track_id=tid, uri=uri, metadata=meta)


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

    Raises:
        CatalogError: the catalog is missing, unreadable, of unknown format, or has no ``uri``
            column / duplicate column names.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit == 0:
        return
    if isinstance(catalog_uri, os.PathLike):
        catalog_uri = os.fspath(catalog_uri)
    where = redact(str(catalog_uri))
    if not isinstance(catalog_uri, str) or not catalog_uri.strip():
        raise CatalogError("empty catalog uri")
    try:
        scheme, _ = _split_scheme(catalog_uri)
        cat = normalize_uri(catalog_uri.strip())
        fs, path = open_uri(cat, storage_options)
        info = _with_retries(lambda: _info(fs, path), where, storage_options=storage_options)
    except FetchError as e:
        msg = str(e)
        if msg.startswith("not found"):
            raise CatalogError(f"catalog not found: {where}") from None
        raise CatalogError(f"cannot open catalog: {msg}") from None
    except UriRefused as e:
        raise CatalogError(f"bad catalog uri: {e}") from None
    is_dir = info.get("type") == "directory"
    base = _catalog_base(cat, is_dir)
    if policy is None:
        policy = UriPolicy(allowed_prefixes=(base,))
    if is_dir:
        rows: Iterator[_Row] = _iter_listing(
            fs, path, None if _is_local_scheme(scheme) else _split_scheme(cat)[0]
        )
    else:
        ext = _catalog_ext(cat)
        if ext is None:
            raise CatalogError(
                f"{where}: unknown catalog format (expected .csv, .tsv, .parquet, .jsonl, .json or a directory)"
            )
        fmt = _TABLE_EXTENSIONS[ext]
        if fmt in ("csv", "tsv"):
            rows = _iter_csv(fs, path, where, "," if fmt == "csv" else "\t", max_row_chars)
        elif fmt == "parquet":
            rows = _iter_parquet(fs, path, where)
        else:
            rows = _iter_jsonl(fs, path, where, max_row_chars)
    seen: dict[str, int] = {}
    n_ok = 0
    try:
        for ix, rec in rows:
            if isinstance(rec, RejectedRow):
                yield rec
                continue
            out = _entry(ix, rec, base, policy, seen, max_row_chars)
            yield out
            if isinstance(out, CatalogEntry):
                n_ok += 1
                if limit is not None and n_ok >= limit:
                    return
    except PipelineError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CatalogError(
            _scrub(f"{where}: cannot read catalog: {type(e).__name__}: {e}", storage_options)
        ) from None
    except Exception as e:
        if type(e).__module__.startswith("pyarrow"):
            raise CatalogError(_scrub(f"{where}: cannot read catalog: {e}", storage_options)) from None
        raise
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()


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
