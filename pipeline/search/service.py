"""HTTP similarity-search service (FastAPI routes, deployed with Ray Serve by
:mod:`pipeline.commands.serve`, i.e. ``jobs/serve_search.py``).

Routes (JSON responses; errors are ``{"error": message, "status": code}``):

``GET /similar/{track_id}?k=&layer=&where=&level=&nprobes=&refine_factor=``
    tracks most similar to a track of the store (the track itself left out).
``POST /search``
    ``application/json`` body ``{"vector": [...]}`` (or ``{"track_id": ...}``) with optional
    ``k`` / ``layer`` / ``where`` / ``level`` / ``nprobes`` / ``refine_factor`` fields (query
    string parameters also work); or an audio file, as ``multipart/form-data`` (the part with a
    filename; other form fields are parameters) or as the raw body (``audio/*`` /
    ``application/octet-stream``, parameters in the query string), embedded with the store's model.
``GET /healthz``, ``GET /info``
    liveness (store row counts) and the store description (layers, dim, model, indexes).

Status codes: 400 bad parameters / unknown layer / bad ``where`` / bad vector, 404 unknown
track, 409 model mismatch, 413 upload over the size limit, 415 unsupported body type, 422 audio
that cannot be decoded, 503 no model for audio queries, 500 anything else.

:class:`SearchService` holds the logic without any web framework (unit-testable);
:func:`create_api` binds it to FastAPI routes; :func:`serve_app` builds the Ray Serve application.
"""

# No ``from __future__ import annotations`` here: FastAPI must see real annotation objects on the
# route methods, which Ray Serve ships to the replica by value (string annotations would not resolve).

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipeline.errors import (
    SearchError,
    one_line,
    redact,
)
from pipeline.search.http import HttpError, error_payload, parse_params, read_body, status_for
from pipeline.search.reader import AudioQuery, TrackQuery, open_store
from pipeline.search.results import TABLES_REFRESH_S

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "HttpError", "SearchService", "create_api", "serve_app", "status_for"]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
_PARAMS = ("k", "layer", "where", "level", "nprobes", "refine_factor")


class SearchService:
    """The service's state and request handling, independent of the web framework.

    Args:
        store: store root (local or ``s3://``).
        storage_options: as for :func:`pipeline.search.reader.open_store`.
        checkpoint / stats / model_config / device: the query-by-audio model; loaded (and checked
            against the store's ``model_id``) at start when ``checkpoint`` is given, else loaded
            from the store's run records on the first audio query.
        max_upload_bytes: larger uploads get 413.
        refresh_s: reopen the store's tables at most this often to see new rows and indexes.
    """

    def __init__(
        self,
        store: str,
        storage_options: Mapping[str, Any] | None = None,
        checkpoint: str | None = None,
        stats: str | None = None,
        model_config: str | None = None,
        device: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        refresh_s: float = TABLES_REFRESH_S,
    ) -> None:
        self.store = open_store(store, storage_options)
        self.max_upload_bytes = int(max_upload_bytes)
        self.refresh_s = float(refresh_s)
        self._refreshed = time.monotonic()
        self._lock = threading.Lock()
        if checkpoint:
            self.store.load_model(checkpoint, stats, model_config, device)

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._refreshed < self.refresh_s:
            return
        with self._lock:
            if now - self._refreshed >= self.refresh_s:
                try:
                    self.store.refresh()
                except Exception as e:  # noqa: BLE001 - keep serving the version we have
                    log.warning("store refresh failed: %s", one_line(redact(str(e))))
                self._refreshed = now

    def _run(self, query: Any, params: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            kwargs = parse_params(params)
            self._maybe_refresh()
            res = self.store.search(query, **kwargs)
            return 200, res.to_dict()
        except (HttpError, SearchError) as e:
            return self.error(e)
        except Exception as e:  # noqa: BLE001
            log.exception("search failed")
            return self.error(e)

    @staticmethod
    def error(exc: BaseException) -> tuple[int, dict[str, Any]]:
        return error_payload(exc)

    # ---- routes

    def similar(self, track_id: str, params: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """``GET /similar/{track_id}``."""
        return self._run(TrackQuery(track_id), params)

    def health(self) -> tuple[int, dict[str, Any]]:
        self._maybe_refresh()
        return 200, {"ok": True, "tracks": self.store.num_tracks, "windows": self.store.num_windows}

    def info(self) -> tuple[int, dict[str, Any]]:
        self._maybe_refresh()
        return 200, self.store.describe()

    def search_body(
        self, content_type: str | None, body: bytes, params: Mapping[str, Any], filename: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """``POST /search`` with the (already size-checked) body."""
        ctype = (content_type or "").split(";", 1)[0].strip().lower()
        try:
            if len(body) > self.max_upload_bytes:
                raise HttpError(
                    413, f"body of {len(body)} bytes is over the limit of {self.max_upload_bytes}"
                )
            if not body:
                raise HttpError(400, 'empty body: send JSON {"vector": [...]} or an audio file')
            if ctype == "application/json":
                return self._search_json(body, params)
            if ctype == "multipart/form-data":
                data, fname, form = self._parse_multipart(content_type or "", body)
                return self._search_audio(data, fname, {**params, **form})
            if ctype.startswith("audio/") or ctype in (
                "application/octet-stream",
                "video/ogg",
                "video/webm",
                "",
            ):
                return self._search_audio(body, filename, params)
            raise HttpError(
                415,
                f"unsupported content type {ctype!r}: use application/json, multipart/form-data "
                "or an audio/* body",
            )
        except HttpError as e:
            return self.error(e)

    def _search_json(self, body: bytes, params: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise HttpError(400, "JSON body must be an object")
        merged = {**params, **{k: doc[k] for k in _PARAMS if k in doc}}
        if "vector" in doc:
            vec = doc["vector"]
            if not isinstance(vec, list) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in vec
            ):
                raise HttpError(400, "vector must be a JSON array of numbers")
            return self._run(vec, merged)
        if "track_id" in doc:
            if not isinstance(doc["track_id"], str):
                raise HttpError(400, "track_id must be a string")
            return self._run(TrackQuery(doc["track_id"]), merged)
        raise HttpError(400, 'JSON body needs "vector" (or "track_id")')

    @staticmethod
    def _parse_multipart(content_type: str, body: bytes) -> tuple[bytes, str | None, dict[str, str]]:
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        msg = BytesParser(policy=HTTP).parsebytes(head + body)
        if not msg.is_multipart():
            raise HttpError(400, "malformed multipart body")
        data, fname, form = None, None, {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            payload = part.get_payload(decode=True) or b""
            if filename is not None or (name in ("file", "audio") and data is None):
                if data is None:
                    data, fname = payload, filename
            elif name:
                form[str(name)] = payload.decode("utf-8", "replace")
        if not data:
            raise HttpError(400, "multipart body has no file part (send the audio as a file field)")
        return data, fname, form

    def _search_audio(
        self, data: bytes, filename: str | None, params: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        try:
            parse_params(params)  # reject bad parameters before the (slow) embedding
        except HttpError as e:
            return self.error(e)
        suffix = os.path.splitext(os.path.basename(filename or ""))[1][:10] or ".bin"
        fd, path = tempfile.mkstemp(prefix="query-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            status, payload = self._run(AudioQuery(path), params)
            if "error" in payload:
                payload["error"] = payload["error"].replace(path, filename or "upload")
            return status, payload
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)


# --------------------------------------------------------------------------- FastAPI / Ray Serve


async def _search_route(svc: SearchService, request: Request) -> JSONResponse:
    try:
        body = await read_body(request, svc.max_upload_bytes)
    except HttpError as e:
        return _reply(svc.error(e))
    params = dict(request.query_params)
    filename = params.pop("filename", None) or request.headers.get("x-filename")
    from starlette.concurrency import run_in_threadpool

    result = await run_in_threadpool(
        svc.search_body, request.headers.get("content-type"), body, params, filename
    )
    return _reply(result)


def _reply(result: tuple[int, dict[str, Any]]) -> JSONResponse:
    status, payload = result
    return JSONResponse(payload, status_code=status)


def create_api(service: SearchService, web: Mapping[str, Any] | None = None) -> FastAPI:
    """A plain FastAPI app serving ``service`` (for ``uvicorn`` or tests without Ray); with ``web``
    (the config of :func:`pipeline.search.web.install_web`) also the catalog page."""
    api = FastAPI(title="MusicFM similarity search", version="1")
    if web is not None:
        from pipeline.search import web as web_mod

        state = web_mod.WebState(service, web)
        web_mod.install_web(api, lambda: state, web)

    @api.get("/similar/{track_id:path}")
    def similar(track_id: str, request: Request) -> JSONResponse:
        return _reply(service.similar(track_id, dict(request.query_params)))

    @api.post("/search")
    async def search(request: Request) -> JSONResponse:
        return await _search_route(service, request)

    @api.get("/healthz")
    def health() -> JSONResponse:
        return _reply(service.health())

    @api.get("/info")
    def info() -> JSONResponse:
        return _reply(service.info())

    return api


def serve_app(
    config: Mapping[str, Any],
    num_cpus: float = 1.0,
    name: str = "SimilaritySearch",
    options: Mapping[str, Any] | None = None,
    web: Mapping[str, Any] | None = None,
) -> Any:
    """The Ray Serve application: replicas holding a :class:`SearchService` built from ``config``
    (the keyword arguments of :class:`SearchService`), with the routes of the module doc.

    ``options``: more ``serve.deployment`` options (``num_replicas``, ``max_ongoing_requests``,
    ``max_queued_requests``, ``backpressure_config``, ``autoscaling_config``; see
    :func:`pipeline.search.web.deployment_options`). ``web``: also serve the catalog page
    (:func:`pipeline.search.web.install_web` config)."""
    from ray import serve

    api = FastAPI(title="MusicFM similarity search", version="1")
    if web is not None:
        from pipeline.search import web as web_mod

        web_mod.install_web(api, web_mod.provider(name), web)

    @serve.deployment(name=name, ray_actor_options={"num_cpus": num_cpus}, **dict(options or {}))
    @serve.ingress(api)
    class SearchDeployment:
        def __init__(self, cfg: Mapping[str, Any]) -> None:
            self.svc = SearchService(**dict(cfg))
            if web is not None:
                from pipeline.search import web as web_mod

                web_mod.attach(name, self.svc, web)

        @api.get("/similar/{track_id:path}")
        def similar(self, track_id: str, request: Request) -> JSONResponse:
            return _reply(self.svc.similar(track_id, dict(request.query_params)))

        @api.post("/search")
        async def search(self, request: Request) -> JSONResponse:
            return await _search_route(self.svc, request)

        @api.get("/healthz")
        def health(self) -> JSONResponse:
            return _reply(self.svc.health())

        @api.get("/info")
        def info(self) -> JSONResponse:
            return _reply(self.svc.info())

    return SearchDeployment.bind(dict(config))
