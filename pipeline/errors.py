"""Exception hierarchy of the data plane, and the redaction applied to every message.

Every exception raised by ``pipeline.audio``, ``pipeline.windows`` and ``pipeline.catalog``
for a *record* (one track) is a :class:`PipelineError`; the Ray stages catch it and write an
error row ``(track_id, uri, stage, error_type(exc), str(exc))``. ``str(exc)`` is always a
one-line human reason with secrets removed (:func:`redact`).

Hierarchy::

    PipelineError            stage "pipeline"
    +-- CatalogError         stage "catalog"  unreadable catalog, bad columns, bad rows
    |   +-- DuplicateTrackId stage "catalog"  a later row reusing a track_id (first one wins)
    +-- UriRefused           stage "catalog"  scheme/prefix not allowed, traversal, symlink escape
    +-- FetchError           stage "fetch"    missing object, directory, too large, storage errors
    +-- DecodeError          stage "decode"   not audio, truncated, zero-byte, NaN/Inf, limits
        +-- TooShortError    stage "decode"   shorter than the minimum length
        +-- WorkerCrashed    stage "decode"   the worker process died on this file again and again
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
    "error_type",
    "redact",
    "one_line",
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


def error_type(exc: BaseException) -> str:
    """The class name stored in the ``error_type`` column of error rows (e.g. ``"DecodeError"``)."""
    return type(exc).__name__


# --- redaction ---------------------------------------------------------------------------------

_SECRET_KEYS = (
    r"(?:aws_)?(?:secret(?:_access)?_key|access_key(?:_id)?|session_token|secret|token|password|passwd"
    r"|pwd|api[_-]?key|key|auth|authorization|credentials?|signature|x-amz-signature"
    r"|x-amz-credential|x-amz-security-token|hf_token)"
)
# key=value in query strings / command lines / k=v lists. Value ends at & ; whitespace , quote ) ]
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
