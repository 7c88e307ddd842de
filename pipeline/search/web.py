"""The catalog web page on the search service: page routes, ``/audio``, auth, CORS, JSON errors.

:func:`install_web` adds to a FastAPI app (the Ray Serve ingress of
:func:`pipeline.search.service.serve_app`, or :func:`pipeline.search.service.create_api`):

``GET /`` and ``GET /static/{name}``
    the page (``pipeline/search/static/``: vanilla JS, nothing fetched from elsewhere).
``GET /api/tracks?q=&limit=``, ``GET /api/track/{id}``, ``GET /api/passage/{id}?window_ix=&k=&layer=``
    find a track (prefix match on id / title / artist words), a track with its windows, and the
    windows most like one window of it ("find this passage").
``GET /api/runs``, ``GET /api/errors?run_id=&q=&stage=``, ``GET /api/duplicates``, ``GET /api/map``
    run history, errors of a run, duplicate groups, map points (see :mod:`.catalog_views`).
``POST /api/upload``
    ``POST /search`` with a time limit on receiving the body (408 past ``upload_timeout_s``).
``POST /api/login``
    with ``Authorization: Bearer TOKEN``: sets an HttpOnly, SameSite=Strict session cookie so the
    page's ``<audio>`` elements (which cannot send headers) are authorized too.
``GET /audio/{track_id}``
    the track's original object (local or object store via fsspec), streamed, with single
    ``Range`` requests (206 + ``Content-Range``; 416 when unsatisfiable), its content type by
    extension, an ETag from ``content_version``. Only the URI stored in ``tracks`` is read, and
    only when the URI policy of the store's runs allows it (403 otherwise).

With a token (``auth_token_sha256``), every route but the page shell and its static files
answers 401 ``{"error": "unauthorized", "status": 401}`` unless the request carries the bearer
token or the session cookie. CORS headers are sent only for the configured origins. Every error
is JSON ``{"error": one line, "status": code}``.
"""

# No ``from __future__ import annotations``: FastAPI must see real annotation objects (see service.py).

import asyncio
import hashlib
import hmac
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import SearchError, one_line, redact
from pipeline.search.catalog_views import AudioRefused, AudioSource, CatalogViews
from pipeline.search.http import HttpError, error_payload, parse_params, read_body
from pipeline.search.results import TABLES_REFRESH_S

__all__ = [
    "SESSION_COOKIE",
    "STATIC_DIR",
    "WebState",
    "attach",
    "deployment_options",
    "install_web",
    "parse_range",
    "token_sha256",
    "web_state",
]

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
SESSION_COOKIE = "musicfm_session"
PUBLIC_PATHS = ("/", "/index.html", "/favicon.ico")
AUDIO_CHUNK = 256 * 1024
DEFAULT_UPLOAD_TIMEOUT_S = 120.0
# The page loads only its own files; media may also be a local blob (the uploaded clip).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


def token_sha256(token: str) -> str:
    """What the app keeps of the auth token: its SHA-256 (the token itself never leaves the CLI)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _session_value(token_hash: str) -> str:
    return hmac.new(token_hash.encode(), b"musicfm-web-session", hashlib.sha256).hexdigest()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """The byte range ``(start, end_inclusive)`` of a ``Range`` header for an object of ``size``
    bytes; ``None`` to answer with the whole object (no header, a malformed one, or several
    ranges, as RFC 9110 allows); ``"unsatisfiable"`` for 416."""
    if not header:
        return None
    m = _RANGE_RE.match(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or (last and end < start):
        return "unsatisfiable"
    return start, min(end, size - 1)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": one_line(redact(message)), "status": status},
        status_code=status,
        headers=dict(headers or {}),
    )


class WebState:
    """Per-replica state of the page routes: the views over the search service's store."""

    def __init__(self, service: Any, config: Mapping[str, Any]) -> None:
        self.service = service
        self.views = CatalogViews(
            service.store, refresh_s=float(getattr(service, "refresh_s", TABLES_REFRESH_S))
        )
        self.upload_timeout_s = float(config.get("upload_timeout_s") or DEFAULT_UPLOAD_TIMEOUT_S)


_STATES: dict[str, WebState] = {}
_STATES_LOCK = threading.Lock()


def attach(key: str, service: Any, config: Mapping[str, Any]) -> WebState:
    """Create the page state of ``service`` under ``key`` (called in each replica's constructor)."""
    state = WebState(service, config)
    with _STATES_LOCK:
        _STATES[key] = state
    return state


def web_state(key: str) -> WebState:
    """The state :func:`attach` made under ``key`` in this process."""
    with _STATES_LOCK:
        return _STATES[key]


# --------------------------------------------------------------------------- middleware (pure ASGI)


class AuthMiddleware:
    """401 without detail unless ``Authorization: Bearer <token>`` or the session cookie matches.
    The page shell and its static files are public (they hold no data) so the page can ask for
    the token; CORS preflights pass (the CORS middleware, outside this one, answers them)."""

    def __init__(self, app: Any, token_hash: str) -> None:
        self.app = app
        self.token_hash = token_hash
        self.session = _session_value(token_hash)

    def _authorized(self, scope: Mapping[str, Any]) -> bool:
        auth = cookie = ""
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                auth = value.decode("latin-1")
            elif name == b"cookie":
                cookie += value.decode("latin-1") + ";"
        if auth[:7].lower() == "bearer ":
            given = token_sha256(auth[7:].strip())
            if hmac.compare_digest(given, self.token_hash):
                return True
        for part in cookie.split(";"):
            k, _, v = part.strip().partition("=")
            if k == SESSION_COOKIE and hmac.compare_digest(v.strip(), self.session):
                return True
        return False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        public = path in PUBLIC_PATHS or path.startswith("/static/") or scope.get("method") == "OPTIONS"
        if public or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        resp = _error(401, "unauthorized", {"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


def install_web(api: FastAPI, state: Callable[[], WebState], config: Mapping[str, Any]) -> None:
    """Add the page, its API, ``/audio``, JSON errors, auth and CORS to ``api``.

    Args:
        api: the FastAPI app (before it starts).
        state: returns the :class:`WebState` of the running replica (``partial(web_state, key)``
            under Ray Serve, where routes and the replica object are shipped separately).
        config: ``auth_token_sha256`` (optional), ``cors_origins`` (list, optional),
            ``upload_timeout_s``.
    """
    token_hash = config.get("auth_token_sha256")
    if token_hash:
        api.add_middleware(AuthMiddleware, token_hash=str(token_hash))
    origins = [o for o in config.get("cors_origins") or () if o]
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        api.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Range", "X-Filename"],
            expose_headers=["Content-Range", "Accept-Ranges", "Content-Length", "Retry-After"],
            allow_credentials=False,
            max_age=600,
        )
    _install_error_handlers(api)
    _install_page(api)
    _install_api(api, state)


def _install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return _error(exc.status_code, detail, getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return _error(400, f"bad parameter {where}: {first.get('msg', 'invalid')}".strip())


def _static_response(name: str) -> Response:
    if not re.fullmatch(r"[A-Za-z0-9_-]+\.(html|js|css|png|svg)", name):
        return _error(404, f"no such file: {name}")
    path = os.path.join(STATIC_DIR, name)
    if not os.path.isfile(path):
        return _error(404, f"no such file: {name}")
    with open(path, "rb") as f:
        body = f.read()
    headers = {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return Response(body, media_type=STATIC_TYPES[os.path.splitext(name)[1]], headers=headers)


def _install_page(api: FastAPI) -> None:
    @api.get("/", include_in_schema=False)
    def index() -> Response:
        return _static_response("index.html")

    @api.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        return _static_response(name)

    @api.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)


def _search_error(exc: BaseException) -> JSONResponse:
    status, payload = error_payload(exc)
    return JSONResponse(payload, status_code=status)


async def _call(fn: Callable[..., Any], *args: Any) -> JSONResponse:
    """Run a view in the thread pool; search errors map to their status, anything else to 500."""
    try:
        result = await run_in_threadpool(fn, *args)
    except (SearchError, ValueError) as e:
        return _search_error(e)
    except Exception as e:  # noqa: BLE001 - one JSON line, logged with its traceback
        log.exception("web route failed")
        return _search_error(e)
    return JSONResponse(result)


def _int(params: Mapping[str, Any], name: str, default: int) -> int:
    value = params.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{name} must be an integer, got {value!r}") from None


def _install_api(api: FastAPI, state: Callable[[], WebState]) -> None:
    @api.post("/api/login")
    def login(request: Request) -> JSONResponse:
        # reached only with a valid bearer token when auth is on (the middleware checks it)
        resp = JSONResponse({"ok": True})
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            value = _session_value(token_sha256(auth[7:].strip()))
            resp.set_cookie(SESSION_COOKIE, value, httponly=True, samesite="strict", path="/")
        return resp

    @api.get("/api/config")
    def config() -> JSONResponse:
        svc = state().service
        return JSONResponse({"max_upload_bytes": svc.max_upload_bytes})

    @api.get("/api/tracks")
    async def tracks(request: Request) -> JSONResponse:
        p = request.query_params
        try:
            limit = _int(p, "limit", 20)
        except HttpError as e:
            return _error(e.status, e.message)
        return await _call(state().views.find, p.get("q", ""), limit)

    @api.get("/api/track/{track_id:path}")
    async def track(track_id: str) -> JSONResponse:
        return await _call(state().views.track, track_id)

    @api.get("/api/passage/{track_id:path}")
    async def passage(track_id: str, request: Request) -> JSONResponse:
        p = dict(request.query_params)
        try:
            window_ix = _int(p, "window_ix", 0)
            kwargs = parse_params(p)
            if p.get("layer") in (None, ""):
                kwargs["layer"] = None
        except HttpError as e:
            return _error(e.status, e.message)
        return await _call(state().views.passage, track_id, window_ix, kwargs)

    @api.get("/api/runs")
    async def runs() -> JSONResponse:
        return await _call(state().views.runs)

    @api.get("/api/errors")
    async def errors(request: Request) -> JSONResponse:
        p = request.query_params
        try:
            limit = _int(p, "limit", 200)
        except HttpError as e:
            return _error(e.status, e.message)
        return await _call(
            state().views.errors, p.get("run_id") or None, p.get("q") or None, p.get("stage") or None, limit
        )

    @api.get("/api/duplicates")
    async def duplicates() -> JSONResponse:
        return await _call(state().views.duplicates)

    @api.get("/api/map")
    async def map_points(request: Request) -> JSONResponse:
        return await _call(state().views.map_points, request.query_params.get("color_by"))

    @api.post("/api/upload")
    async def upload(request: Request) -> JSONResponse:
        st = state()
        svc = st.service
        try:
            body = await asyncio.wait_for(read_body(request, svc.max_upload_bytes), st.upload_timeout_s)
        except HttpError as e:
            return _error(e.status, e.message)
        except asyncio.TimeoutError:
            return _error(408, f"the upload took longer than {st.upload_timeout_s:g} s")
        params = dict(request.query_params)
        filename = params.pop("filename", None) or request.headers.get("x-filename")
        status, payload = await run_in_threadpool(
            svc.search_body, request.headers.get("content-type"), body, params, filename
        )
        return JSONResponse(payload, status_code=status)

    @api.api_route("/audio/{track_id:path}", methods=["GET", "HEAD"])
    async def audio(track_id: str, request: Request) -> Response:
        views = state().views
        try:
            src = await run_in_threadpool(views.audio_source, track_id)
        except AudioRefused as e:
            return _error(403, str(e))
        except SearchError as e:
            return _search_error(e)
        return await _audio_response(views, src, request)


async def _audio_response(views: CatalogViews, src: AudioSource, request: Request) -> Response:
    from pipeline.errors import PipelineError
    from pipeline.io.objects import open_uri

    def stat() -> tuple[Any, str, int]:
        fs, path = open_uri(src.uri, views.fsspec_options())
        return fs, path, int(fs.size(path))

    try:
        fs, path, size = await run_in_threadpool(stat)
    except FileNotFoundError:
        return _error(404, f"the audio of {src.track_id!r} is gone from its storage")
    except (PipelineError, OSError, ValueError) as e:
        return _error(502, f"cannot read the audio of {src.track_id!r}: {e}")
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Type": src.content_type,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, max-age=3600",
    }
    if src.etag:
        headers["ETag"] = src.etag
    rng = parse_range(request.headers.get("range"), size)
    if rng == "unsatisfiable":
        return _error(416, f"range not satisfiable (size {size})", {"Content-Range": f"bytes */{size}"})
    if rng is None:
        start, end, status = 0, size - 1, 200
    else:
        start, end = rng  # type: ignore[misc]
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(max(0, end - start + 1))
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_read_range(fs, path, start, end), status_code=status, headers=headers)


def _read_range(fs: Any, path: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``start..end`` (inclusive) of ``path``, in chunks (a sync iterator: Starlette runs it
    in its thread pool)."""
    left = end - start + 1
    if left <= 0:
        return
    with fs.open(path, "rb") as f:
        f.seek(start)
        while left > 0:
            chunk = f.read(min(AUDIO_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def provider(key: str) -> Callable[[], WebState]:
    """The ``state`` argument of :func:`install_web` for the replica registered under ``key``."""
    return partial(web_state, key)


def deployment_options(
    replicas: tuple[int, int] = (1, 1),
    max_ongoing: int = 64,
    max_queued: int = 64,
    retry_after_s: float = 1.0,
) -> dict[str, Any]:
    """``serve.deployment`` options for the search app.

    ``replicas`` ``(n, n)`` is a fixed count; ``(lo, hi)`` with ``lo < hi`` turns on Serve
    autoscaling between them, aiming at half of ``max_ongoing`` requests in flight per replica.
    Past ``max_ongoing`` per replica, requests wait in the proxy's queue; past ``max_queued``
    waiting there, they get a fast 503 with ``Retry-After`` instead of a growing queue.
    """
    lo, hi = replicas
    opts: dict[str, Any] = {
        "max_ongoing_requests": int(max_ongoing),
        "max_queued_requests": int(max_queued),
        "backpressure_config": {"status_code": 503, "retry_after_s": float(retry_after_s)},
    }
    if hi > lo:
        opts["autoscaling_config"] = {
            "min_replicas": int(lo),
            "max_replicas": int(hi),
            "initial_replicas": int(lo),
            "target_ongoing_requests": max(1.0, max_ongoing / 2),
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 60.0,
        }
    else:
        opts["num_replicas"] = int(lo)
    return opts
