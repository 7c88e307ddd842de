"""HTTP plumbing shared by the search service and the catalog page: the status of each error,
JSON error bodies, parameter parsing and bounded request bodies (no FastAPI app here)."""

# No ``from __future__ import annotations``: FastAPI must see real annotation objects.

from collections.abc import Mapping
from typing import Any

from pipeline.errors import (
    AudioQueryError,
    InvalidQueryError,
    ModelMismatchError,
    ModelUnavailableError,
    SearchError,
    StoreNotFoundError,
    UnknownLayerError,
    UnknownTrackError,
    one_line,
    redact,
)
from pipeline.search.reader import LEVELS, MAX_K

__all__ = ["HttpError", "error_payload", "parse_params", "read_body", "status_for"]

MAX_WHERE_CHARS = 4096


class HttpError(Exception):
    """An error with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = one_line(redact(message))


def status_for(exc: BaseException) -> int:
    """HTTP status of a search error."""
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, UnknownTrackError):
        return 404
    if isinstance(exc, UnknownLayerError | InvalidQueryError):
        return 400
    if isinstance(exc, ModelMismatchError):
        return 409
    if isinstance(exc, AudioQueryError):
        return 422
    if isinstance(exc, ModelUnavailableError | StoreNotFoundError):
        return 503
    if isinstance(exc, SearchError):
        return 400
    return 500


def _int_param(name: str, value: Any, lo: int, hi: int | None = None) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise HttpError(400, f"{name} must be an integer, got {value!r}")
    try:
        v = int(value)
        if isinstance(value, float) and v != value:
            raise ValueError
    except (TypeError, ValueError):
        raise HttpError(400, f"{name} must be an integer, got {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise HttpError(400, f"{name} must be in {bound}, got {v}")
    return v


def parse_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validated search keyword arguments from query-string / JSON / form parameters."""
    k = _int_param("k", params.get("k"), 1, MAX_K)
    layer = _int_param("layer", params.get("layer"), 0)
    where = params.get("where")
    if where is not None and not isinstance(where, str):
        raise HttpError(400, "where must be a string")
    if where and len(where) > MAX_WHERE_CHARS:
        raise HttpError(400, f"where is longer than {MAX_WHERE_CHARS} characters")
    level = params.get("level") or "track"
    if level not in LEVELS:
        raise HttpError(400, f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    return {
        "k": 10 if k is None else k,
        "layer": layer,
        "where": where or None,
        "level": level,
        "nprobes": _int_param("nprobes", params.get("nprobes"), 1),
        "refine_factor": _int_param("refine_factor", params.get("refine_factor"), 1),
    }


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HttpError(413, f"body of {int(declared)} bytes is over the limit of {limit}")
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """``(status, {"error": one line, "status": status})`` of an exception."""
    status = status_for(exc)
    msg = exc.message if isinstance(exc, HttpError) else one_line(redact(str(exc)))
    if status == 500:
        msg = f"internal error: {type(exc).__name__}: {msg}"
    return status, {"error": msg, "status": status}
