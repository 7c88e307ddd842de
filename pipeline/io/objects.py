"""Object access: fsspec filesystems, retries, object versions, fetching bytes.

Storage options (either accepted style, their translation for fsspec and Lance, secret
scrubbing) live in :mod:`pipeline.io.storage_options`; their names are re-exported here.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as _dt
import itertools
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec

from pipeline.errors import FetchError, PipelineError, error_type, one_line, redact
from pipeline.io.storage_options import (
    fsspec_options,
    lance_options,
    normalize_storage_options,
    parse_storage_options,
    redacted,
    scrub,
)
from pipeline.io.uris import split_scheme

__all__ = [
    "DEFAULT_MAX_BYTES",
    "check_output",
    "content_version",
    "fetch_bytes",
    "fsspec_options",
    "is_remote",
    "join",
    "lance_options",
    "normalize_storage_options",
    "object_info",
    "object_versions",
    "open_uri",
    "parse_storage_options",
    "redacted",
    "scrub",
    "with_retries",
    "VersionLookup",
]

DEFAULT_MAX_BYTES = 2 * 1024**3


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


# --------------------------------------------------------------------------- filesystems


def open_uri(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path for ``uri`` (``fsspec.core.url_to_fs``).

    ``storage_options`` in either style (see the module docstring). Local paths and ``file://``
    URIs give the local filesystem.

    Raises:
        FetchError: no filesystem implementation for the scheme, or bad options.
    """
    scheme, _ = split_scheme(uri)
    so = fsspec_options(uri, storage_options)
    if scheme == "gcs":
        uri = "gs" + uri[3:]
    try:
        fs, path = fsspec.core.url_to_fs(uri, **so)
    except ImportError as e:
        raise FetchError(scrub(f"no filesystem for '{scheme}' URIs (missing package): {e}", so)) from None
    except (ValueError, TypeError) as e:
        raise FetchError(scrub(f"cannot open {uri}: {e}", so)) from None
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


def is_transient(exc: BaseException) -> bool:
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


def with_retries(
    fn: Callable[[], _T],
    what: str,
    tries: int = 3,
    backoff_s: float = 0.2,
    storage_options: Mapping[str, Any] | None = None,
) -> _T:
    """Call ``fn``; retry transient errors (:func:`is_transient`) up to ``tries`` times in all,
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
            raise FetchError(scrub(f"access denied: {what}: {e}", storage_options)) from None
        except Exception as e:  # classified below
            if not is_transient(e):
                raise FetchError(
                    scrub(f"storage error on {what}: {type(e).__name__}: {e}", storage_options)
                ) from None
            last = e
            if i + 1 < tries:
                time.sleep(backoff_s * (2**i))
    assert last is not None
    raise FetchError(
        scrub(
            f"storage error on {what} after {max(1, tries)} tries: {type(last).__name__}: {last}",
            storage_options,
        )
    )


def object_info(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    with contextlib.suppress(Exception):  # cache invalidation is best effort
        fs.invalidate_cache(path)
    return fs.info(path)


def version_from_info(info: Mapping[str, Any], fs: fsspec.AbstractFileSystem, path: str) -> str:
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
    info = with_retries(lambda: object_info(fs, path), uri, storage_options=storage_options)
    return version_from_info(info, fs, path)


#: Keys an S3-style LIST returns per request (``max-keys``); GCS and Azure page similarly.
LIST_PAGE = 1000


@dataclass
class VersionLookup:
    """What :func:`object_versions` found.

    Attributes:
        versions: uri -> ``content_version`` (the same string :func:`content_version` gives).
        errors: uri -> ``(error_type, one-line message)`` for objects that are missing or unreadable.
        unlisted: uris no listing covered, left for the caller to HEAD (only with ``head=False``).
        lists: LIST requests (pages of :data:`LIST_PAGE` entries, failed tries included).
        heads: HEAD (object metadata) requests, failed tries included.
        prefixes: prefixes listed.
    """

    versions: dict[str, str] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    unlisted: list[str] = field(default_factory=list)
    lists: int = 0
    heads: int = 0
    prefixes: int = 0

    @property
    def requests(self) -> int:
        return self.lists + self.heads


def _parent(uri: str) -> tuple[str, str]:
    head, _, name = uri.rpartition("/")
    return head, name


def parent_prefix(uri: str) -> str:
    """The prefix :func:`object_versions` lists for ``uri`` (``s3://b/x/y.flac`` -> ``s3://b/x``)."""
    return _parent(uri)[0]


def _list_prefix(
    parent: str, group: Mapping[str, str], storage_options: Mapping[str, Any] | None
) -> tuple[dict[str, str] | None, int]:
    """One prefix listed (non-recursive) and joined with the wanted names of ``group`` (name ->
    uri): ``({name: version} of the wanted names found, or None if the listing failed, LIST
    requests)``. Runs in a worker thread; only the versions outlive the call (not the listing's
    entries, nor the filesystem's directory cache)."""
    tries = 0
    try:
        fs, path = open_uri(parent, storage_options)
    except FetchError:
        return None, 0

    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    seen = 0  # entries listed, wanted or not (what an object store pages through)

    def attempt() -> list[dict[str, Any]]:
        nonlocal tries, seen
        tries += 1
        if local:  # streamed: only the wanted entries are kept (as version_from_info reads them)
            keep, seen = [], 0
            with os.scandir(path) as it:
                for d in it:
                    seen += 1
                    if d.name in group and d.is_file():
                        keep.append({"name": d.path, "type": "file"})
            return keep
        with contextlib.suppress(Exception):  # a stale directory cache would give stale versions
            fs.invalidate_cache(path)
        listing = fs.ls(path, detail=True)
        seen = len(listing)
        return listing

    try:
        entries = with_retries(attempt, parent, storage_options=storage_options)
    except FetchError:
        return None, tries
    finally:
        with contextlib.suppress(Exception):  # s3fs keeps listings: millions of entries
            fs.invalidate_cache(path)
    pages = max(1, -(-seen // LIST_PAGE))
    got: dict[str, str] = {}
    for e in entries:
        if e.get("type") == "directory":
            continue
        name = str(e.get("name", "")).rstrip("/").rpartition("/")[2]
        if name in group:
            got[name] = version_from_info(e, fs, str(e["name"]))
    return got, pages + tries - 1


def _head_version(
    uri: str, storage_options: Mapping[str, Any] | None
) -> tuple[str | None, tuple[str, str] | None, int]:
    """One object's version by HEAD: ``(version or None, (error_type, message) or None, HEAD
    requests)``; a missing/unreadable object is reported, not raised."""
    tries = 0

    def attempt() -> str:
        nonlocal tries
        tries += 1
        fs, path = open_uri(uri, storage_options)
        return version_from_info(object_info(fs, path), fs, path)

    try:
        return with_retries(attempt, uri, storage_options=storage_options), None, tries
    except PipelineError as e:
        return None, (error_type(e), redact(one_line(str(e) or type(e).__name__))), tries


def object_versions(
    uris: Iterable[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    min_per_prefix: int = 2,
    threads: int = 16,
    head: bool = True,
) -> VersionLookup:
    """Versions of many objects with few requests: list prefixes, HEAD only the rest.

    The uris are grouped by parent prefix (``s3://b/x/y.flac`` -> ``s3://b/x``). A prefix holding
    at least ``min_per_prefix`` of them is listed once (non-recursive, ``ls(detail=True)``: one
    LIST per :data:`LIST_PAGE` entries, each with ETag, size and mtime) and joined by name; a
    wanted object the listing lacks is missing (an error, as a HEAD would say). Uris of smaller
    groups, and of prefixes whose listing fails (e.g. no ``s3:ListBucket`` permission), get one
    HEAD each (:func:`content_version`), or are returned in ``unlisted`` with ``head=False``.
    Listings and HEADs run ``threads`` at a time. Requests are counted as an object store bills
    them (LIST pages, HEADs, retries included; a filesystem's internal retries are not seen).
    Local paths are treated the same way (a listing is a directory read)."""
    groups: dict[str, dict[str, str]] = {}
    for uri in dict.fromkeys(uris):
        parent, name = _parent(uri)
        groups.setdefault(parent, {})[name] = uri
    out = VersionLookup()
    to_list = [p for p, g in groups.items() if p and len(g) >= max(1, min_per_prefix)]
    rest = [u for p, g in groups.items() if not (p and len(g) >= max(1, min_per_prefix)) for u in g.values()]
    so = itertools.repeat(storage_options)
    pool = cf.ThreadPoolExecutor(max_workers=max(1, threads)) if threads > 1 else None
    run = pool.map if pool is not None else map  # in order, ``threads`` at a time
    try:
        listed = run(_list_prefix, to_list, [groups[p] for p in to_list], so)
        for parent, (got, n) in zip(to_list, listed, strict=True):
            out.lists += n
            group = groups.pop(parent)
            if got is None:
                rest += list(group.values())
                continue
            out.prefixes += 1
            for name, uri in group.items():
                v = got.get(name)
                if v is not None:
                    out.versions[uri] = v
                else:
                    out.errors[uri] = ("FetchError", redact(f"not found: {uri}"))
        if not head:
            out.unlisted = rest
            return out
        heads = run(_head_version, rest, so)
        for uri, (version, err, n) in zip(rest, heads, strict=True):
            out.heads += n
            if version is not None:
                out.versions[uri] = version
            else:
                assert err is not None
                out.errors[uri] = err
    finally:
        if pool is not None:
            pool.shutdown()
    return out


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
    data, version = fetch_object(uri, storage_options, max_bytes, tries=tries, backoff_s=backoff_s)
    assert isinstance(data, bytes)  # no spool_dir: always in memory
    return data, version


#: Read size when an object is spooled to a local file (:func:`fetch_object`).
SPOOL_BLOCK_BYTES = 8 * 1024**2


def fetch_object(
    uri: str,
    storage_options: dict | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    spool_dir: str | None = None,
    spool_above: int = 0,
    tries: int = 3,
    backoff_s: float = 0.2,
) -> tuple[bytes | str, str]:
    """:func:`fetch_bytes`, except that an object over ``spool_above`` bytes is copied, a block of
    :data:`SPOOL_BLOCK_BYTES` at a time, into a new file under ``spool_dir`` whose path is
    returned instead of its bytes (the caller removes it): a process fetching a 6-hour recording
    holds one block, not the file. Same checks, limits, retries and version as :func:`fetch_bytes`."""
    fs, path = open_uri(uri, storage_options)

    def attempt() -> tuple[bytes | str, str]:
        size, version = _checked_info(fs, path, uri, max_bytes)
        # capped read: an object that grew after info() still cannot exceed max_bytes + 1 in memory.
        # Capped at the known size too: a local read(n) allocates n bytes up front, and 2 GiB of
        # address space per file fails under RLIMIT_AS or strict overcommit.
        cap = max_bytes if size is None else min(max_bytes, size)
        if spool_dir is not None and size is not None and size > spool_above:
            return _spool(fs, path, uri, spool_dir, cap, size), version
        data = fs.cat_file(path, start=0, end=cap + 1)
        if len(data) > max_bytes:
            raise FetchError(f"object is over the {max_bytes}-byte limit: {uri}")
        if size is not None and len(data) > size:
            raise FetchError(f"object changed while being read (now over {size} bytes): {uri}")
        return bytes(data), version

    return with_retries(attempt, uri, tries=tries, backoff_s=backoff_s, storage_options=storage_options)


def _checked_info(fs: Any, path: str, uri: str, max_bytes: int) -> tuple[int | None, str]:
    """(size or None, content version) of a regular object within ``max_bytes`` (FetchError else)."""
    info = object_info(fs, path)
    kind = info.get("type")
    if kind == "directory":
        raise FetchError(f"is a directory, not a file: {uri}")
    if kind not in (None, "file"):  # FIFOs, sockets, devices: reading could block forever
        raise FetchError(f"not a regular file ({kind}): {uri}")
    size = info.get("size")
    if size is not None and int(size) > max_bytes:
        raise FetchError(f"object is {int(size)} bytes, over the {max_bytes}-byte limit: {uri}")
    return (None if size is None else int(size)), version_from_info(info, fs, path)


def _spool(fs: Any, path: str, uri: str, spool_dir: str, cap: int, size: int) -> str:
    """Copy at most ``cap + 1`` bytes of ``path`` into a new file under ``spool_dir``; its path.
    The partial file is removed on any failure (the retry starts a new one)."""
    os.makedirs(spool_dir, exist_ok=True)
    fd, local = tempfile.mkstemp(dir=spool_dir, suffix=os.path.splitext(path)[1][:16])
    try:
        copied = 0
        with os.fdopen(fd, "wb") as out, fs.open(path, "rb", block_size=SPOOL_BLOCK_BYTES) as src:
            while copied <= cap:
                block = src.read(min(SPOOL_BLOCK_BYTES, cap + 1 - copied))
                if not block:
                    break
                out.write(block)
                copied += len(block)
        if copied > size:
            raise FetchError(f"object changed while being read (now over {size} bytes): {uri}")
        return local
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(local)
        raise


def check_output(output: str, storage_options: dict[str, Any] | None = None) -> None:
    """Raise ``ValueError`` (one line) at once when the store root cannot be written: an object
    store bucket that does not exist or cannot be reached, a local path that is not a writable
    directory. Transient storage errors are retried; nothing is created remotely."""
    where = redact(output)
    if "://" in output and not output.startswith("file://"):
        scheme, rest = output.split("://", 1)
        bucket = rest.split("/", 1)[0]
        try:
            fs, _ = open_uri(output, dict(storage_options or {}))
            with_retries(lambda: fs.info(bucket), f"{scheme}://{bucket}", storage_options=storage_options)
        except FetchError as e:
            msg = str(e)
            if msg.startswith("not found"):
                msg = "the bucket does not exist"
            raise ValueError(f"--output {where}: cannot use bucket {bucket!r}: {msg}") from None
        except Exception as e:
            raise ValueError(
                scrub(
                    f"--output {where}: cannot use bucket {bucket!r}: {type(e).__name__}: {e}",
                    storage_options,
                )
            ) from None
        return
    path = output[len("file://") :] if output.startswith("file://") else output
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip("/")) or ("/" if path.startswith("/") else ".")
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--output {where}: {probe} is not a writable directory")
