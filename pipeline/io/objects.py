"""Object access: fsspec filesystems, retries, object versions, fetching bytes, and the one
translator of storage options.

``--storage-options`` (and every API taking ``storage_options``) accepts either style:

* s3fs style: ``endpoint_url``, ``key``, ``secret``, ``token``, ``region`` /
  ``client_kwargs.region_name``, ``anon``;
* Lance / object_store style: ``aws_endpoint`` (or ``aws_endpoint_url``), ``aws_access_key_id``,
  ``aws_secret_access_key``, ``aws_session_token``, ``aws_region``, ``allow_http``,
  ``aws_skip_signature``.

:func:`normalize_storage_options` turns either into the s3fs style; :func:`fsspec_options` and
:func:`lance_options` derive what fsspec/s3fs and Lance need. Missing values come from the
standard AWS environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec

from pipeline.errors import FetchError, PipelineError, error_type, is_secret_key, one_line, redact
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


# --------------------------------------------------------------------------- storage options

#: Lance / object_store key -> s3fs-style key.
_OBJECT_STORE_KEYS = {
    "aws_access_key_id": "key",
    "access_key_id": "key",
    "aws_secret_access_key": "secret",
    "secret_access_key": "secret",
    "aws_session_token": "token",
    "session_token": "token",
    "aws_endpoint": "endpoint_url",
    "aws_endpoint_url": "endpoint_url",
    "endpoint": "endpoint_url",
    "aws_region": "region",
    "aws_default_region": "region",
}
#: object_store keys with no s3fs counterpart: implied by other values, or Lance-only.
_LANCE_ONLY_KEYS = ("allow_http", "aws_skip_signature", "aws_virtual_hosted_style_request",
                    "virtual_hosted_style_request", "timeout", "connect_timeout")  # fmt: skip


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """Parse the ``--storage-options`` JSON (an object) and check its keys; raise ValueError with
    a one-line reason."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options is not valid JSON: {e.msg} at char {e.pos}") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object")
    return normalize_storage_options(value)


def normalize_storage_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Either accepted style -> the s3fs style (the project's one internal form). Lance-only
    keys (``allow_http``, ``aws_skip_signature``, timeouts) are kept as ``lance_<key>`` hints."""
    out: dict[str, Any] = {}
    for k, v in (storage_options or {}).items():
        key = str(k)
        low = key.lower()
        if low in _OBJECT_STORE_KEYS:
            out.setdefault(_OBJECT_STORE_KEYS[low], v)
        elif low == "aws_skip_signature":
            out.setdefault("anon", str(v).lower() in ("1", "true", "yes"))
        elif low in _LANCE_ONLY_KEYS:
            out[f"lance_{low}"] = v
        else:
            out[key] = v
    return out


def fsspec_options(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri`` (s3fs wants ``client_kwargs.region_name``; the
    endpoint falls back to ``AWS_ENDPOINT_URL[_S3]``)."""
    so = {k: v for k, v in normalize_storage_options(storage_options).items() if not k.startswith("lance_")}
    scheme, _ = split_scheme(uri)
    if scheme not in ("s3", "s3a"):
        return so
    ck = dict(so.get("client_kwargs") or {})
    if "region" in so:  # the pipeline's neutral key
        ck.setdefault("region_name", so.pop("region"))
        so["client_kwargs"] = ck
    if "endpoint_url" not in so and "endpoint_url" not in ck:
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if ep:
            so["endpoint_url"] = ep
    return so


def lance_options(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str] | None:
    """Lance (object_store) ``storage_options`` for ``uri``; ``None`` for local paths without options."""
    so = normalize_storage_options(storage_options)
    hints = {k[len("lance_") :]: v for k, v in so.items() if k.startswith("lance_")}
    if not uri.startswith(("s3://", "s3a://")):
        rest = {k: v for k, v in so.items() if not k.startswith("lance_") and k != "client_kwargs"}
        out = {**rest, **hints}
        return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in out.items()} or None
    ck = dict(so.get("client_kwargs") or {})
    env = os.environ
    endpoint = (
        so.get("endpoint_url")
        or ck.get("endpoint_url")
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
    )
    region = (
        so.get("region") or ck.get("region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    )
    out = {
        "aws_access_key_id": so.get("key") or env.get("AWS_ACCESS_KEY_ID"),
        "aws_secret_access_key": so.get("secret") or env.get("AWS_SECRET_ACCESS_KEY"),
        "aws_session_token": so.get("token") or env.get("AWS_SESSION_TOKEN"),
        "aws_region": region or "us-east-1",
        "aws_endpoint": endpoint,
    }
    if endpoint and str(endpoint).startswith("http://"):
        out["allow_http"] = "true"
    if so.get("anon"):
        out["aws_skip_signature"] = "true"
    out.update(hints)
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in out.items() if v}


def redacted(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy safe to log or store: secret values replaced by ``***``."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redacted(v)
        elif is_secret_key(str(k)):
            out[k] = "***"
        else:
            out[k] = v
    return out


def secret_values(storage_options: Mapping[str, Any] | None) -> list[str]:
    """The secret values in ``storage_options`` (nested too), to scrub from messages."""
    out: list[str] = []

    def walk(d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v)
            elif isinstance(v, str) and len(v) >= 4 and is_secret_key(str(k)):
                out.append(v)

    if storage_options:
        walk(storage_options)
    return out


def scrub(text: str, storage_options: Mapping[str, Any] | None) -> str:
    """``text`` with the secret values of ``storage_options`` and every known secret pattern removed."""
    for v in secret_values(storage_options):
        text = text.replace(v, "***")
    return redact(text)


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

    def list_one(parent: str) -> tuple[str, dict[str, str] | None, int]:
        """One prefix listed and joined in the worker thread: ``(parent, {name: version} of the
        wanted names found, or None if the listing failed, requests)``. Only the versions
        outlive the call (not the listing's entries, nor the filesystem's directory cache)."""
        tries = 0
        group = groups[parent]
        try:
            fs, path = open_uri(parent, storage_options)
        except FetchError:
            return parent, None, 0

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
            return parent, None, tries
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
        return parent, got, pages + tries - 1

    pool = cf.ThreadPoolExecutor(max_workers=max(1, threads)) if threads > 1 else None
    try:
        listed = pool.map(list_one, to_list) if pool else map(list_one, to_list)
        for parent, got, n in listed:
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

        def head_one(uri: str) -> tuple[str, str | None, tuple[str, str] | None, int]:
            tries = 0

            def attempt() -> str:
                nonlocal tries
                tries += 1
                fs, path = open_uri(uri, storage_options)
                return version_from_info(object_info(fs, path), fs, path)

            try:
                return uri, with_retries(attempt, uri, storage_options=storage_options), None, tries
            except PipelineError as e:  # a missing/unreadable object is reported, not raised
                return uri, None, (error_type(e), redact(one_line(str(e) or type(e).__name__))), tries

        heads = pool.map(head_one, rest) if pool else map(head_one, rest)
        for uri, version, err, n in heads:
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
    fs, path = open_uri(uri, storage_options)

    def attempt() -> tuple[bytes, str]:
        info = object_info(fs, path)
        kind = info.get("type")
        if kind == "directory":
            raise FetchError(f"is a directory, not a file: {uri}")
        if kind not in (None, "file"):  # FIFOs, sockets, devices: reading could block forever
            raise FetchError(f"not a regular file ({kind}): {uri}")
        size = info.get("size")
        if size is not None and int(size) > max_bytes:
            raise FetchError(f"object is {int(size)} bytes, over the {max_bytes}-byte limit: {uri}")
        version = version_from_info(info, fs, path)
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

    return with_retries(attempt, uri, tries=tries, backoff_s=backoff_s, storage_options=storage_options)


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
