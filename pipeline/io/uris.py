"""Catalog URIs: normalization, resolution against a base, stable track ids and the URI policy.

Every URI goes through a :class:`UriPolicy` before anything reads it: only allowed schemes,
only under allowed prefixes (by default the catalog's own directory or prefix), no ``..``
escapes, no local symlinks resolving outside, no NUL or control characters, at most
:data:`MAX_URI_CHARS` characters.

URIs are normalized: local files become plain absolute paths (``file://`` accepted on input),
object-store URIs keep their scheme (``s3://bucket/key``; ``gcs://`` becomes ``gs://``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from dataclasses import dataclass, field

from pipeline.errors import UriRefused

__all__ = [
    "AUDIO_EXTENSIONS",
    "MAX_URI_CHARS",
    "MAX_TRACK_ID_CHARS",
    "UriPolicy",
    "catalog_base",
    "catalog_ext",
    "is_local_scheme",
    "normalize_uri",
    "resolve_uri",
    "split_scheme",
    "stable_track_id",
]

#: File name extensions of audio files (directory / prefix catalogs list these; search treats a
#: query with one of them as audio).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".oga", ".aif", ".aiff")
MAX_URI_CHARS = 4096
MAX_TRACK_ID_CHARS = 512

#: Catalog table formats by file extension (each optionally compressed).
TABLE_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst")

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
#: NUL and control characters: never allowed in a URI or a track id.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def split_scheme(uri: str) -> tuple[str | None, str]:
    """``"s3://b/k"`` -> ``("s3", "//b/k")``; ``"/a/b"`` -> ``(None, "/a/b")``."""
    m = _SCHEME_RE.match(uri)
    if not m:
        return None, uri
    return m.group(1).lower(), uri[m.end() :]


def is_local_scheme(scheme: str | None) -> bool:
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
    scheme, rest = split_scheme(uri)
    if is_local_scheme(scheme):
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


def has_dotdot(uri: str) -> bool:
    scheme, rest = split_scheme(uri)
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
    scheme, _ = split_scheme(ref)
    if scheme is not None or ref.startswith("/"):
        return normalize_uri(ref)
    bscheme, _ = split_scheme(base_uri)
    if is_local_scheme(bscheme):
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
    return id_of_normalized(normalize_uri(uri))


def id_of_normalized(norm: str) -> str:
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
            scheme, rest = split_scheme(p)
            if is_local_scheme(scheme):
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
        return cls(allowed_prefixes=(catalog_base(catalog_uri, None), *tuple(extra_prefixes)))

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
        if CONTROL_RE.search(uri):
            raise UriRefused("uri contains control characters")
        scheme, _ = split_scheme(uri)
        kind = "file" if is_local_scheme(scheme) else scheme
        if scheme is None and not uri.startswith("/"):
            raise UriRefused(f"not an absolute path or URI: {uri}")
        if kind not in self.allowed_schemes:
            raise UriRefused(f"scheme '{kind}' is not allowed (allowed: {', '.join(self.allowed_schemes)})")
        norm = uri if _normalized else normalize_uri(uri)
        traversal = "path traversal: " if has_dotdot(uri) else ""
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


def catalog_ext(uri: str) -> str | None:
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    for c in COMPRESSION_EXTENSIONS:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    for ext in TABLE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


def catalog_base(catalog_uri: str, is_dir: bool | None) -> str:
    """The directory/prefix (with trailing ``/``) relative refs of a catalog resolve against."""
    scheme, _ = split_scheme(catalog_uri)
    norm = normalize_uri(catalog_uri)
    if is_local_scheme(scheme):
        if is_dir is None:
            is_dir = os.path.isdir(norm)
        d = norm if is_dir else os.path.dirname(norm)
        return d.rstrip("/") + "/"
    if is_dir is None:
        is_dir = norm.endswith("/") or catalog_ext(norm) is None
    if is_dir:
        return norm if norm.endswith("/") else norm + "/"
    head, _, tail = norm.partition("://")
    return f"{head}://{tail.rsplit('/', 1)[0]}/" if "/" in tail else f"{head}://{tail}/"
