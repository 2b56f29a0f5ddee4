"""The FastAPI application: middleware (Host and Origin checks, CORS, the body size limit,
cancellation on disconnect), the API key, JSON errors, health, metrics, the docs and the gallery.

The API's routes are one module per group (``api_openai``, ``api_search``, ``api_items``); each
translates HTTP to ``Service`` and ``Collection`` calls and back. Every error leaves as
``{"error": {"message", "type", ...}}`` with its status: 400 bad input, 401 API key, 404,
413 too large, 422 validation, 500 when the server's disk fails (``storage_error``), 503 while the
model loads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import (
    ClipsearchError,
    DeviceUnavailableError,
    ForbiddenURLError,
    ImageError,
    MissingExtraError,
    MissingWeightsError,
    ModelMismatchError,
    NamespaceNotFoundError,
    NotFoundError,
    StorageError,
    TooLargeError,
)
from ..store import Store, open_store
from . import api_items, api_openai, api_search
from .http import TOO_DEEP, ModelNotFoundError, json_error_message
from .metrics import Metrics
from .schemas import (
    ErrorResponse,
    Health,
)
from .service import (
    ConflictError,
    Loader,
    LoadFailedError,
    ServerSettings,
    Service,
    StartingError,
)

log = logging.getLogger("clipsearch.server")
GALLERY = resources.files("clipsearch.server") / "gallery"
DOCS_ASSETS = resources.files("fastapi_offline") / "static"


class AuthError(ClipsearchError):
    """Missing or wrong API key (HTTP 401)."""


def _status(e: ClipsearchError) -> tuple[int, str, str | None]:
    """(HTTP status, OpenAI-style error type, code) for a user-facing error."""
    if isinstance(e, StartingError | LoadFailedError | MissingWeightsError | DeviceUnavailableError):
        return 503, "service_unavailable", "model_not_ready"
    if isinstance(e, AuthError):
        return 401, "authentication_error", "invalid_api_key"
    if isinstance(e, ModelNotFoundError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(e, ConflictError):
        return 409, "invalid_request_error", "already_exists"
    if isinstance(e, NotFoundError):
        return 404, "not_found_error", None
    if isinstance(e, TooLargeError):
        return 413, "invalid_request_error", "too_large"
    if isinstance(e, ForbiddenURLError):
        return 400, "invalid_request_error", "url_not_allowed"
    if isinstance(e, ImageError):
        return 400, "invalid_request_error", "invalid_image"
    if isinstance(e, ModelMismatchError):
        return 400, "invalid_request_error", "model_mismatch"
    if isinstance(e, MissingExtraError):  # this server's install lacks it: not the request's fault
        return 501, "server_error", "missing_extra"
    if isinstance(e, StorageError):  # the server's disk: not the request's fault
        return 500, "server_error", "storage_error"
    return 400, "invalid_request_error", None


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
    body: dict[str, Any] = {"message": message, "type": type_}
    if param is not None:
        body["param"] = param
    if code is not None:
        body["code"] = code
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "5"}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


# A body must keep arriving: a client silent this long between two parts of it is dropped with
# a 408, and the whole body must be in within BODY_TOTAL_SECONDS (a slow client holds memory and
# a connection; 32 MiB at 2 Mbit/s takes two minutes).
BODY_IDLE_SECONDS = 20.0
BODY_TOTAL_SECONDS = 180.0


def key_problem(headers: dict[str, str], api_key: str | None) -> str | None:
    """Why a request's Authorization header does not hold ``api_key``; None if it does (or the
    server has no key)."""
    if not api_key:
        return None
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return "missing API key: send the header 'Authorization: Bearer <key>'"
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode("utf-8"), api_key.encode("utf-8")):
        return "invalid API key"
    return None


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not they declare a length;
    read a body only from a client that holds the API key (when the server has one), checked
    from the headers first; and drop a body that stops arriving (408).

    The body is read (up to the limit) before the app sees it, so no handler or parser can be
    fed more than the limit, and a client without the key cannot make the server hold any.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, api_key: str | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.api_key = api_key

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"request body is larger than the {self.max_bytes / 1024 / 1024:g} MiB limit "
            "(the server's --max-request-mb)",
            "invalid_request_error",
            "too_large",
        )
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = key_problem(headers, self.api_key)
        if problem is not None:
            await error_response(401, problem, "authentication_error", "invalid_api_key")(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        deadline = asyncio.get_running_loop().time() + BODY_TOTAL_SECONDS
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, min(BODY_IDLE_SECONDS, left)))
            except TimeoutError:
                message = "the request body stopped arriving; send it whole, without long pauses"
                await error_response(408, message, "invalid_request_error", "body_timeout")(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        if scope.get("path") not in _CANCELLABLE:
            await self.app(scope, _replay(bytes(body), receive), send)
            return
        await _run_cancelled_on_disconnect(self.app, scope, bytes(body), receive, send)


# Routes that only compute an answer: if its client has gone, nobody needs it. A write (adding
# an item) runs to its end, so that it is all done or not at all.
_CANCELLABLE = {"/v1/embeddings", "/embed", "/api/v1/search", "/api/v1/images/search", "/api/v1/vectors/search"}


def _replay(body: bytes, then: Receive) -> Receive:
    """A ``receive`` that gives the app the already read ``body`` in one message, then ``then``."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return replay


async def _run_cancelled_on_disconnect(app: ASGIApp, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
    """Run the app on an already read ``body``, and cancel it if the client disconnects.

    Starlette keeps running a handler whose client has gone: a 1000-text request abandoned after
    0.3 s still cost the model its 1000 texts, ahead of everyone else's. Here the client's
    channel is watched while the app runs; a disconnect cancels the handler, whose batched
    inputs are then dropped before they reach the model (``batching``).
    """
    disconnected = asyncio.Event()

    async def after_body() -> Message:
        await disconnected.wait()  # the app asks again only to learn of a disconnect
        return {"type": "http.disconnect"}

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
                handler.cancel()
                return

    handler = asyncio.ensure_future(app(scope, _replay(body, after_body), send))
    watcher = asyncio.ensure_future(watch())
    try:
        await handler
    except asyncio.CancelledError:
        if not disconnected.is_set():
            raise  # the server itself is stopping
    finally:
        watcher.cancel()


_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _host_name(value: str) -> str:
    """The host of a Host header or an origin's authority, without its port: ``[::1]:8080`` → ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class InternalErrorMiddleware:
    """A bug is answered with one JSON 500 and logged with its traceback, and goes no further: an
    exception that reached uvicorn after the answer began would make it close the connection,
    and the client's next request on it would fail with a reset."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # half an answer is out: the connection cannot carry another
                raise
            await error_response(500, f"internal error: {type(e).__name__}", "server_error")(scope, receive, send)


class HostOriginMiddleware:
    """Serve only the allowed Host names, and refuse state-changing requests a browser sends
    from another origin unless that origin is allowed.

    A multipart POST needs no CORS preflight, so without the Origin check any web page the user
    visits could add items (cross-site request forgery); without the Host check a hostile domain
    resolving to 127.0.0.1 could read results, paths and thumbnails (DNS rebinding). Clients that
    are not browsers send no Origin and are not affected.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {_host_name(h) for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("headers", [])
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
        for name in (b"host", b"origin"):
            if sum(1 for k, _ in raw if k == name) > 1:  # which one would a check believe?
                message = f"more than one {name.decode().title()} header; send one"
                await error_response(400, message, "invalid_request_error", "duplicate_header")(scope, receive, send)
                return
        host = headers.get("host", "")
        if not self.any_host and _host_name(host) not in self.hosts:
            message = (
                f"this server does not serve the host name {host[:100]!r}; start it with "
                f"--allowed-hosts {_host_name(host)[:100] or 'NAME'} if that name is meant to reach it"
            )
            await error_response(400, message, "invalid_request_error", "host_not_allowed")(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and scope["method"] not in _SAFE_METHODS and not self._origin_ok(origin, host):
            message = (
                f"cross-origin {scope['method']} from {origin[:100]} refused; allow that site with --allowed-origins"
            )
            await error_response(403, message, "permission_error", "origin_not_allowed")(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins or "*" in self.origins:
            return True
        scheme, _, authority = origin.partition("://")
        return scheme in ("http", "https") and authority == host.strip().lower()  # same origin


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Bad input"),
        (401, "Missing or wrong API key"),
        (404, "Not found"),
        (409, "An item with this id exists (add ?replace=true)"),
        (413, "Request or image too large"),
        (422, "Validation error"),
        (503, "The model is still loading"),
    )
}


_OPERATOR_SETTINGS = {f.name for f in dataclasses.fields(ServerSettings)} - {"namespace"}


def http_name(param: str) -> str:
    """An argument as an HTTP client reads it: a request field by its name; a server setting as
    the ``serve`` flag that sets it."""
    return "--" + param.replace("_", "-") if param in _OPERATOR_SETTINGS else param


def create_app(settings: ServerSettings, loader: Loader, store: Store | None = None) -> FastAPI:
    """The app for ``settings``; ``loader`` returns (encoder, model spec) and runs at start-up."""
    service = Service(settings, store if store is not None else open_store(settings.db), loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title="clipsearch",
        version=__version__,
        summary="CLIP embeddings (OpenAI-compatible) and semantic image search.",
        lifespan=lifespan,
        responses=_ERROR_RESPONSES,
        docs_url=None,  # served below from local assets: FastAPI's own pages load them from a CDN
        redoc_url=None,
    )
    app.state.service = service
    metrics = Metrics()
    metrics.watch_batcher("text", service.text_batcher)
    metrics.watch_batcher("image", service.image_batcher)
    app.state.metrics = metrics
    app.middleware("http")(metrics.middleware)
    # added last = outermost: the Host check first, CORS answers preflights, then the rest
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, api_key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    app.add_middleware(
        HostOriginMiddleware, allowed_hosts=settings.allowed_hosts, allowed_origins=settings.allowed_origins
    )
    app.add_middleware(InternalErrorMiddleware)  # outermost: it answers for every layer inside

    # -- errors ------------------------------------------------------------------------
    @app.exception_handler(ClipsearchError)
    async def _clipsearch_error(request: Request, e: ClipsearchError):
        status, type_, code = _status(e)
        # the library names an argument as Python does (same_filter): so does the request; one of
        # the server's own settings, which only its operator changes, as the `serve` flag
        message = e.worded(http_name)
        if isinstance(e, NamespaceNotFoundError):  # where the store lives is the server's business
            message = f"namespace {e.namespace!r} does not exist"
        if isinstance(e, StorageError):  # the operator's to mend: the whole line goes to the log
            log.error("%s %s: %s", request.method, request.url.path, e)
            kept = "; the change in progress was rolled back" if e.rolled_back else ""
            message = f"the server could not read or write its database ({e.code}){kept}; its log says why"
        return error_response(status, message, type_, code, param=e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(400, json_error_message(errors[0]), "invalid_request_error", "invalid_json")
        parts = []
        for err in errors[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error_response(422, "; ".join(parts) or "invalid request", "invalid_request_error", "validation_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = str(e.detail)
        if isinstance(e.__cause__, RecursionError):  # FastAPI's body parser met deeply nested JSON
            message = TOO_DEEP
        if e.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs"
        return error_response(e.status_code, message, type_)

    # -- auth --------------------------------------------------------------------------
    async def require_key(request: Request) -> None:
        problem = key_problem(dict(request.headers), settings.api_key)
        if problem is not None:
            raise AuthError(problem)

    api = APIRouter(dependencies=[Depends(require_key)])

    # -- metrics -----------------------------------------------------------------------
    @api.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests by route and status, latency, model batch sizes, queue
        depth, embeddings made (behind the API key, when one is set)."""
        return Response(metrics.render(), media_type=metrics.content_type)

    # -- health and models -------------------------------------------------------------
    @app.head("/health", include_in_schema=False)  # load balancers probe with HEAD
    @app.get("/health", response_model=Health, tags=["service"])
    async def health():
        items = await service.run(service.total_items)
        encoder = service.encoder
        body = Health(
            status=service.status,  # type: ignore[arg-type]
            model=service.model_id,
            device=service.device,
            dimensions=encoder.dim if encoder else None,
            items=items,
            message=service.error if service.status == "failed" else None,
        )
        if service.status == "healthy":
            return body
        payload = body.model_dump()
        message = service.error or "the model is still loading"
        payload["error"] = {"message": message, "type": "service_unavailable"}
        return JSONResponse(payload, status_code=503, headers={"Retry-After": "5"})

    app.include_router(api)
    for group in (api_openai.router, api_search.router, api_items.router):
        app.include_router(group, dependencies=[Depends(require_key)])

    # -- API docs, from assets shipped with fastapi-offline (a machine without internet sees them)
    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="clipsearch API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="clipsearch API",
            redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        )

    app.mount("/docs-assets", StaticFiles(directory=str(DOCS_ASSETS)), name="docs-assets")

    # -- gallery -----------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def gallery():
        return FileResponse(str(GALLERY / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(GALLERY)), name="static")
    return app
