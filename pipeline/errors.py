"""Exception hierarchy of the data plane, and the redaction applied to every message.

Every exception raised by ``pipeline.io.audio``, ``pipeline.io.windows`` and ``pipeline.io.catalog``
for a *record* (one track) is a :class:`PipelineError`; the Ray stages catch it and write an
error row ``(track_id, uri, stage, error_type(exc), str(exc))``. ``str(exc)`` is always a
one-line human reason with secrets removed (:func:`redact`).

Hierarchy (one tree for the whole package)::

    PipelineError            stage "pipeline"   (per record: becomes an error row)
    +-- CatalogError         stage "catalog"  unreadable catalog, bad columns, bad rows
    |   +-- DuplicateTrackId stage "catalog"  a later row reusing a track_id (first one wins)
    +-- UriRefused           stage "catalog"  scheme/prefix not allowed, traversal, symlink escape
    +-- FetchError           stage "fetch"    missing object, directory, too large, storage errors
    +-- DecodeError          stage "decode"   not audio, truncated, zero-byte, NaN/Inf, limits
        +-- TooShortError    stage "decode"   shorter than the minimum length
        +-- WorkerCrashed    stage "decode"   the worker process died on this file again and again
    +-- NonFiniteOutput      stage "model"    the model's output for this window has NaN/Inf
                                              (error_type ``non_finite_output``)

    RunFailed                a run stopped in its Ray phase (one line with the root cause)
    ModelError               the model stage failed for a reason that is not one input's (a bug,
                             a checkpoint that does not fit, a device fault, non-finite output for
                             most windows): the run stops; never an error row
    RefreshError             a refresh that cannot proceed (incompatible store, unsafe plan)
    +-- RefreshLocked        another live refresh holds the store's lease
    +-- LeaseLost            this run lost its lease
    InjectedFailure          test hook ``MUSICFM_FAIL_AT``
    SearchError              a query a caller can act on (mapped to 4xx by the HTTP service)
    +-- StoreNotFoundError, UnknownLayerError, UnknownTrackError, InvalidQueryError,
        ModelMismatchError, ModelUnavailableError, AudioQueryError

Secrets: :func:`is_secret_key` says whether an option / field name holds a secret (the one list
of secret names); :func:`redact` removes secrets from any text.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "PipelineError",
    "CatalogError",
    "DuplicateTrackId",
    "UriRefused",
    "FetchError",
    "DecodeError",
    "TooShortError",
    "WorkerCrashed",
    "NonFiniteOutput",
    "ModelError",
    "error_type",
    "redact",
    "one_line",
    "is_secret_key",
    "root_cause",
    "RunFailed",
    "RefreshError",
    "RefreshLocked",
    "LeaseLost",
    "InjectedFailure",
    "SearchError",
    "StoreNotFoundError",
    "UnknownLayerError",
    "UnknownTrackError",
    "InvalidQueryError",
    "ModelMismatchError",
    "ModelUnavailableError",
    "AudioQueryError",
]

#: Environment variables whose *values* are scrubbed from every message.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)

_MAX_MESSAGE_CHARS = 2000


def one_line(text: str, max_chars: int = _MAX_MESSAGE_CHARS) -> str:
    """Collapse whitespace runs (newlines included) to single spaces and cap the length."""
    text = " ".join(str(text).split())
    if len(text) > max_chars:
        text = text[: max_chars - 3] + "..."
    return text


class PipelineError(Exception):
    """Base of all per-record pipeline failures. ``str(e)`` is a redacted one-line reason."""

    stage: str = "pipeline"

    def __init__(self, message: str = "", *args: object) -> None:
        msg = one_line(redact(str(message))) if message else self.__class__.__name__
        super().__init__(msg, *args)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class CatalogError(PipelineError):
    """The catalog itself cannot be read (missing, unparsable, no ``uri`` column, ...)."""

    stage = "catalog"


class DuplicateTrackId(CatalogError):
    """A catalog row whose ``track_id`` was already used by an earlier row (the first wins)."""


class UriRefused(PipelineError):
    """A URI outside the allowed schemes/prefixes, a traversal, a symlink escape, NUL, too long."""

    stage = "catalog"


class FetchError(PipelineError):
    """The object cannot be fetched: not found, a directory, too large, storage errors."""

    stage = "fetch"


class DecodeError(PipelineError):
    """The bytes are not decodable audio, or the audio breaks a limit (channels, duration, NaN)."""

    stage = "decode"


class TooShortError(DecodeError):
    """Decoded audio shorter than the minimum length a model can take."""


class WorkerCrashed(DecodeError):
    """The decode worker process died (segfault, abort, killed for memory) on this file repeatedly."""


class NonFiniteOutput(PipelineError):
    """The model's output for one window has NaN or Inf values: that window's track becomes an
    error row instead of storing garbage."""

    stage = "model"
    code = "non_finite_output"


def error_type(exc: BaseException) -> str:
    """What the ``error_type`` column of error rows says: the exception's ``code`` when it has one
    (``"non_finite_output"``), else its class name (e.g. ``"DecodeError"``)."""
    code = getattr(type(exc), "code", None)
    return code if isinstance(code, str) else type(exc).__name__


# --- redaction ---------------------------------------------------------------------------------

_SECRET_KEYS = (
    r"(?:aws_)?(?:secret(?:_access)?_key|access_key(?:_id)?|session_token|secret|token|password|passwd"
    r"|pwd|api[_-]?key|key|auth|authorization|credentials?|signature|x-amz-signature"
    r"|x-amz-credential|x-amz-security-token|hf_token)"
)
# key=value in query strings / command lines / k=v lists. Value ends at & ; whitespace , quote ) ]
_SECRET_NAME_RE = re.compile(rf"(?i)^{_SECRET_KEYS}$|secret|token|password|passwd|credential")


def is_secret_key(name: str) -> bool:
    """Whether an option or field called ``name`` holds a secret (``key``, ``secret``,
    ``aws_secret_access_key``, ``token``, ``password``, ``credentials``, ...)."""
    return bool(_SECRET_NAME_RE.search(str(name)))


_KV_RE = re.compile(rf"(?i)(?<![\w-])({_SECRET_KEYS})(\s*=\s*)([^&;\s,'\")\]}}]+)")
# "key": "value" / "key": 123 in JSON / Python reprs (double or single quotes)
_JSON_RE = re.compile(rf"(?i)([\"'])({_SECRET_KEYS})\1(\s*:\s*)(?:([\"'])(.*?)(?<!\\)\4|([^\s,}}\]]+))")
# scheme://user:pass@host or scheme://token@host
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/\s@'\"]+)@")
# Authorization: Bearer xxx / AWS4-HMAC-SHA256 Credential=...
_BEARER_RE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}")
# Hugging Face tokens anywhere
_HF_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")

REDACTED = "***"


def _json_sub(m: re.Match[str]) -> str:
    q, name, colon, vq = m.group(1), m.group(2), m.group(3), m.group(4)
    value = f"{vq}{REDACTED}{vq}" if vq else REDACTED
    return f"{q}{name}{q}{colon}{value}"


def redact(text: str) -> str:
    """Remove secrets from ``text``.

    Scrubs: the values of :data:`SECRET_ENV_VARS` present in the environment (>= 4 chars);
    ``key=``/``secret=``/``token=``/``password=`` (and similar) query/k=v parameters;
    the same names as JSON/dict fields (``"secret": "..."``); URL userinfo
    (``s3://key:secret@bucket`` -> ``s3://***@bucket``); bearer tokens and ``hf_...`` tokens.

    >>> redact("s3://AKIA:abc@bucket/x?token=zzz&a=1")
    's3://***@bucket/x?token=***&a=1'
    """
    if not text:
        return text
    text = str(text)
    for var in SECRET_ENV_VARS:
        val = os.environ.get(var)
        if val and len(val) >= 4:
            text = text.replace(val, REDACTED)
    text = _USERINFO_RE.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _JSON_RE.sub(_json_sub, text)
    text = _KV_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _BEARER_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _HF_TOKEN_RE.sub(REDACTED, text)
    return text


# --------------------------------------------------------------------------- runs


class RunFailed(RuntimeError):
    """A run that stopped in its Ray phase; the message is one line with the root cause."""


class ModelError(RuntimeError):
    """The model stage failed for a reason that is not one input's: a bug in our code, a checkpoint
    that does not fit, a device fault that persists, or non-finite output for most windows. It
    stops the run (exit 1, status "failed"); it never becomes error rows."""


def root_cause(exc: BaseException) -> str:
    """``"Type: message"`` of the innermost cause of ``exc``, one line, redacted.

    Ray's task errors carry the worker's traceback as text (the cause chain does not survive
    pickling), so the first ``SomethingError: message`` line of that text is the root cause.
    """
    e: BaseException = exc
    for _ in range(20):  # follow the in-process chain (RayTaskError keeps the original in .cause)
        nxt = getattr(e, "cause", None)
        if not isinstance(nxt, BaseException):
            nxt = e.__cause__
        if not isinstance(nxt, BaseException) or nxt is e:
            break
        e = nxt
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$", text, re.MULTILINE)
    if m and "ray::" in text:
        found = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    else:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        found = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return one_line(redact(found), 500)


# --------------------------------------------------------------------------- refresh


class RefreshError(RuntimeError):
    """A refresh that cannot proceed (incompatible store, unsafe plan)."""


class RefreshLocked(RefreshError):
    """Another refresh holds the store's lease."""


class LeaseLost(RefreshError):
    """This run's lease expired or was taken over; it stops before its next commit."""


class InjectedFailure(RuntimeError):
    """Raised by :func:`pipeline.faults.failpoint` when ``MUSICFM_FAIL_AT`` names the step (tests only)."""


# --------------------------------------------------------------------------- search


class SearchError(Exception):
    """Base of the errors a caller can act on (bad query, unknown id/layer, wrong model...).

    ``str(e)`` is one line with secrets redacted; CLIs print it as is and exit 2, the HTTP
    service maps the subclasses to 4xx codes.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(redact(message)))

    def __str__(self) -> str:  # KeyError subclasses would otherwise repr() the message
        return str(self.args[0]) if self.args else type(self).__name__


class StoreNotFoundError(SearchError, FileNotFoundError):
    """No embedding store (no readable ``tracks.lance``) at the given root."""


class UnknownLayerError(SearchError, ValueError):
    """The requested layer has no vector column; the message lists the available layers."""


class UnknownTrackError(SearchError, KeyError):
    """A query ``track_id`` that is not in ``tracks.lance``."""


class InvalidQueryError(SearchError, ValueError):
    """A malformed request: bad vector, k, level, nprobes, refine factor or ``where`` predicate."""


class ModelMismatchError(SearchError, ValueError):
    """Query-by-audio with a model whose ``model_id`` differs from the store's."""


class ModelUnavailableError(SearchError, RuntimeError):
    """Query-by-audio without a model, and none can be found from the store's run records."""


class AudioQueryError(SearchError, ValueError):
    """The query audio could not be fetched, decoded or embedded."""
