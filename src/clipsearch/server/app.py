"""The FastAPI application: routes, API-key check, request size limit and JSON errors.

Routes translate HTTP to ``Service`` calls and back. Every error leaves as
``{"error": {"message", "type", ...}}`` with its status: 400 bad input, 401 API key, 404,
413 too large, 422 validation, 503 while the model loads.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import secrets
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import (
    ClipsearchError,
    DeviceUnavailableError,
    ForbiddenURLError,
    ImageError,
    MissingWeightsError,
    NamespaceNotFoundError,
    NotFoundError,
    TooLargeError,
    UsageError,
)
from ..store import Hit, Item, Store, open_store
from .metrics import Metrics
from .schemas import (
    DeletedResponse,
    DuplicatesResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    Health,
    ImageEmbedding,
    ImageInput,
    ImageSearchRequest,
    ItemResponse,
    ModelCard,
    ModelList,
    NamespaceList,
    SearchRequest,
    SearchResponse,
    VectorSearchRequest,
)
from .service import (
    ConflictError,
    ImageBudget,
    Loader,
    LoadFailedError,
    ServerSettings,
    Service,
    StartingError,
    gather_in_order,
    labelled,
)

log = logging.getLogger("clipsearch.server")
GALLERY = resources.files("clipsearch.server") / "gallery"
DOCS_ASSETS = resources.files("fastapi_offline") / "static"
_RESERVED_FORM_FIELDS = {"file", "image", "namespace", "id", "metadata"}
_IMAGE_FIELDS = ("file", "image")  # the form field of an uploaded image: either name


class AuthError(ClipsearchError):
    """Missing or wrong API key (HTTP 401)."""


class ModelNotFoundError(NotFoundError):
    """A request named a model this server does not serve."""


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


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not they declare a length.

    The body is read (up to the limit) before the app sees it, so no handler or parser can be
    fed more than the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

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
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        body = bytearray()
        while True:
            message = await receive()
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


_TOO_DEEP = "the request body's JSON is nested too deeply to parse; send at most a few hundred levels"


def _not_json(what: str, position: int | None) -> str:
    """The one wording of a body that is not JSON: where and what."""
    where = "" if position is None else f" at character {position}"
    return f"the request body is not valid JSON{where}: {what}"


def _json_error_message(err: dict[str, Any]) -> str:
    """``_not_json`` for FastAPI's own parse error (which says only "JSON decode error")."""
    loc = err.get("loc", ())
    what = str((err.get("ctx") or {}).get("error") or "not valid JSON")
    return _not_json(what, loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None)


async def _json_body(request: Request) -> Any:
    """A route's own JSON parsing, worded as FastAPI's is (400, where and what)."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except RecursionError:
        raise _BadJSON(_TOO_DEEP) from None
    except UnicodeDecodeError:
        raise _BadJSON("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise _BadJSON(_not_json(e.msg, e.pos)) from None


def _json_field(name: str, raw: str) -> Any:
    """A form field that carries a JSON object (``filter``, ``metadata``)."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise UsageError(f"the {name!r} field must be a JSON object")
    return parsed


class _BadJSON(ClipsearchError):
    """A body that is not JSON (HTTP 400)."""


def _literal_suffix(request: Request, suffix: str) -> bool:
    """Whether the request path ends in ``/suffix`` written as such: an item id containing a
    slash is sent encoded (``x%2Fthumbnail``), and Starlette decodes it before routing, so only
    the raw path tells ``GET …/x%2Fthumbnail`` (the item ``x/thumbnail``) from ``…/x/thumbnail``."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    return raw.split(b"?", 1)[0].rstrip(b"/").endswith(b"/" + suffix.encode())


_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _host_name(value: str) -> str:
    """The host of a Host header or an origin's authority, without its port: ``[::1]:8080`` → ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


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
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
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


def _thumbnail_url(item: Item) -> str:
    return f"/api/v1/items/{quote(item.id, safe='')}/thumbnail?namespace={quote(item.namespace, safe='')}"


def _results(namespace: str, hits: list[Hit]) -> SearchResponse:
    return SearchResponse.model_validate(
        {
            "namespace": namespace,
            "results": [
                {
                    "id": h.item.id,
                    "score": round(h.score, 6),
                    "metadata": h.item.metadata,
                    "thumbnail_url": _thumbnail_url(h.item),
                }
                for h in hits
            ],
        }
    )


def _item_response(item: Item) -> ItemResponse:
    return ItemResponse(
        id=item.id,
        namespace=item.namespace,
        metadata=item.metadata,
        created_at=item.created_at,
        updated_at=item.updated_at,
        thumbnail_url=_thumbnail_url(item),
    )


def _multipart_body(properties: dict[str, Any], also: dict[str, Any] | None = None, **schema: Any) -> dict[str, Any]:
    """OpenAPI request body of a multipart form with an image ``file`` (for routes that parse the
    form themselves, so FastAPI cannot describe it); ``also`` adds other content types."""
    fields = {"file": {"type": "string", "format": "binary"}, **properties}
    form = {"schema": {"type": "object", "required": ["file"], "properties": fields, **schema}}
    return {"required": True, "content": {"multipart/form-data": form, **(also or {})}}


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
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
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

    # -- errors ------------------------------------------------------------------------
    @app.exception_handler(ClipsearchError)
    async def _clipsearch_error(request: Request, e: ClipsearchError):
        status, type_, code = _status(e)
        # the library names an argument as Python does (same_filter): so does the request
        message = e.worded(e.param)
        if isinstance(e, NamespaceNotFoundError):  # where the store lives is the server's business
            message = f"namespace {e.namespace!r} does not exist"
        return error_response(status, message, type_, code, param=e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(400, _json_error_message(errors[0]), "invalid_request_error", "invalid_json")
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
            message = _TOO_DEEP
        if e.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs"
        return error_response(e.status_code, message, type_)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    # -- auth --------------------------------------------------------------------------
    async def require_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise AuthError("missing API key: send the header 'Authorization: Bearer <key>'")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode("utf-8"), settings.api_key.encode("utf-8")
        ):
            raise AuthError("invalid API key")

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

    @api.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def list_models():
        encoder = service.ready_encoder()
        card = {"id": service.model_id, "created": service.started_at, "dimensions": encoder.dim}
        return {"object": "list", "data": [card]}

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"])
    async def retrieve_model(model_id: str):
        """The served model (the OpenAI client's ``models.retrieve``); 404 for any other id."""
        encoder = service.ready_encoder()
        if model_id not in service.accepted_models():
            raise ModelNotFoundError(f"this server serves the model {service.model_id!r}, not {model_id!r}")
        return {"id": service.model_id, "created": service.started_at, "dimensions": encoder.dim}

    # -- embeddings --------------------------------------------------------------------
    @api.post("/v1/embeddings", response_model=EmbeddingResponse, tags=["openai"])
    async def create_embeddings(req: EmbeddingRequest):
        """OpenAI-compatible embeddings of texts and images in one vector space."""
        encoder = service.ready_encoder()
        if req.model and req.model not in service.accepted_models():
            raise ModelNotFoundError(
                f"this server serves the model {service.model_id!r}, not {req.model!r}; use model={service.model_id!r} "
                "(or start it with --served-model-name)"
            )
        if req.dimensions is not None and req.dimensions != encoder.dim:
            raise UsageError(
                f"dimensions={req.dimensions} is not supported: {encoder.model_id} embeddings have "
                f"{encoder.dim} dimensions; pass dimensions={encoder.dim} or leave it out"
            )
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        if not inputs:
            raise UsageError("input must not be empty")
        if len(inputs) > settings.max_inputs:
            raise UsageError(f"too many inputs: {len(inputs)} (at most {settings.max_inputs} per request)")
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, str]] = []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                texts.append((i, x))
            elif isinstance(x, ImageInput):
                images.append((i, x.image))
            else:
                texts.append((i, x.text))

        budget = ImageBudget(settings.max_request_image_bytes)

        async def fetch(i: int, ref: str) -> bytes:
            try:
                return await service.image_bytes(ref, budget)
            except ClipsearchError as e:
                raise labelled(f"input[{i}]", e) from None

        async def image_vectors() -> np.ndarray:
            if not images:
                return np.zeros((0, encoder.dim), np.float32)
            blobs = await gather_in_order(fetch(i, ref) for i, ref in images)
            return await service.embed_images(blobs, [f"input[{i}]" for i, _ in images])

        async def text_vectors() -> tuple[np.ndarray, int]:
            if not texts:
                return np.zeros((0, encoder.dim), np.float32), 0
            return await service.embed_texts([t for _, t in texts])

        (text_out, text_tokens), image_out = await asyncio.gather(text_vectors(), image_vectors())
        vectors: list[np.ndarray] = [None] * len(inputs)  # type: ignore[list-item]
        for (i, _), v in zip(texts, text_out, strict=True):
            vectors[i] = v
        for (i, _), v in zip(images, image_out, strict=True):
            vectors[i] = v
        tokens = text_tokens + len(images) * encoder.image_tokens
        matrix = np.ascontiguousarray(np.stack(vectors), dtype="<f4")
        if req.encoding_format == "base64":
            data = [
                {"object": "embedding", "index": i, "embedding": base64.b64encode(row.tobytes()).decode()}
                for i, row in enumerate(matrix)
            ]
        else:
            # orjson writes float32 arrays directly, with the shortest exact float32 digits
            data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(matrix)]
        body = {
            "object": "list",
            "data": data,
            "model": service.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    async def _read_upload(upload: UploadFile | StarletteUploadFile) -> bytes:
        data = await upload.read(settings.max_image_bytes + 1)
        if len(data) > settings.max_image_bytes:
            raise TooLargeError(f"image is larger than the {settings.max_image_bytes / 1024 / 1024:g} MiB limit")
        if not data:
            raise ImageError("the uploaded file is empty")
        return data

    async def _form_with_file(request: Request, max_fields: int) -> tuple[FormData, bytes, str | None]:
        """A multipart form whose ``file`` (or ``image``) field holds one image: (form, image
        bytes, file name)."""
        missing = RequestValidationError(
            [
                {
                    "type": "missing",
                    "loc": ("body", "file"),
                    "msg": "send the image as a multipart file field named 'file' (or 'image')",
                }
            ]
        )
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise missing
        form = await request.form(max_files=2, max_fields=max_fields)
        uploads = [form.get(name) for name in _IMAGE_FIELDS if form.get(name) is not None]
        if len(uploads) > 1:
            raise UsageError("send the image in one field, 'file' or 'image', not both")
        upload = uploads[0] if uploads else None
        if not isinstance(upload, StarletteUploadFile):
            raise missing
        return form, await _read_upload(upload), upload.filename

    @api.post(
        "/embed",
        response_model=ImageEmbedding,
        tags=["embeddings"],
        openapi_extra={"requestBody": _multipart_body({})},
    )
    async def embed_upload(request: Request):
        """Embed one uploaded image (a multipart ``file`` or ``image`` field)."""
        encoder = service.ready_encoder()
        _, data, _ = await _form_with_file(request, max_fields=5)
        vector = (await service.embed_images([data]))[0]
        return {"embedding": vector.tolist(), "dimensions": encoder.dim, "model": service.model_id}

    # -- search ------------------------------------------------------------------------
    @api.post("/api/v1/search", response_model=SearchResponse, tags=["search"])
    async def search_text(req: SearchRequest):
        """Text → image search: by CLIP vector, by keyword, or both fused (``mode``)."""
        namespace = service.namespace_name(req.namespace)
        if req.mode != "keyword":
            service.ready_encoder()  # 503 while the model loads
        collection = service.collection(namespace)
        plan = await service.run(
            functools.partial(
                collection.plan_search,
                req.text,
                limit=req.limit,
                filter=req.filter,
                mode=req.mode,
                add=req.add,
                subtract=req.subtract,
            )
        )
        texts = (await service.embed_texts(plan.texts))[0] if plan.texts else None
        return _results(namespace, await service.run(collection.finish_search, plan, texts))

    @api.post("/api/v1/vectors/search", response_model=SearchResponse, tags=["search"])
    async def search_by_vector(req: VectorSearchRequest):
        """Nearest items to a raw vector (it is L2-normalised first)."""
        namespace = service.namespace_name(req.namespace)
        collection = service.collection(namespace)
        plan = await service.run(
            functools.partial(collection.plan_search, vector=req.embedding, limit=req.limit, filter=req.filter)
        )
        return _results(namespace, await service.run(collection.finish_search, plan))

    @api.post(
        "/api/v1/images/search",
        response_model=SearchResponse,
        tags=["search"],
        openapi_extra={
            "requestBody": _multipart_body(
                {
                    "namespace": {"type": "string"},
                    "limit": {"type": "integer", "default": 10},
                    "filter": {"type": "string", "description": "the filter object, as JSON"},
                },
                also={"application/json": {"schema": ImageSearchRequest.model_json_schema()}},
            )
        },
    )
    async def search_by_image(request: Request):
        """Image → image search: a multipart ``file``, or JSON ``{"image": URL | data-URI}``."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form, data, _ = await _form_with_file(request, max_fields=20)
            fields: dict[str, Any] = {
                k: form.get(k) for k in ("namespace", "limit", "filter") if isinstance(form.get(k), str) and form.get(k)
            }
            if "filter" in fields:
                fields["filter"] = _json_field("filter", fields["filter"])
            payload: Any = {"image": "-", **fields}
        else:
            payload = await _json_body(request)
        try:
            # one validation for both forms: a bad limit is the same 422 in a form as in JSON
            req = ImageSearchRequest.model_validate(payload)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        if not ctype.startswith("multipart/form-data"):
            data = await service.image_bytes(req.image)
        namespace = service.namespace_name(req.namespace)
        service.ready_encoder()
        collection = service.collection(namespace)
        plan = await service.run(
            functools.partial(collection.plan_search, image=data, limit=req.limit, filter=req.filter)
        )
        vector = (await service.embed_images([data]))[0]
        return _results(namespace, await service.run(collection.finish_search, plan, None, vector))

    # -- items -------------------------------------------------------------------------
    @api.post(
        "/api/v1/items",
        response_model=ItemResponse,
        status_code=201,
        tags=["items"],
        openapi_extra={
            "requestBody": _multipart_body(
                {
                    "namespace": {"type": "string"},
                    "id": {"type": "string", "description": "Default: a new random id."},
                    "metadata": {"type": "string", "description": "A JSON object merged into metadata."},
                },
                additionalProperties={"type": "string", "description": "Stored as metadata."},
            )
        },
    )
    async def add_item(
        request: Request,
        replace: bool = Query(False, description="Replace an existing item with this id (else 409)."),
    ):
        """Store and index an uploaded image; other form fields become its metadata. An id that
        exists is refused with 409 unless ``?replace=true``."""
        form, data, filename = await _form_with_file(request, max_fields=200)
        metadata: dict[str, Any] = {}
        raw_meta = form.get("metadata")
        if raw_meta:
            metadata.update(_json_field("metadata", str(raw_meta)))
        for key, value in form.multi_items():
            if key not in _RESERVED_FORM_FIELDS and isinstance(value, str):
                metadata[key] = value
        namespace = service.namespace_name(str(form.get("namespace") or "") or None)
        item_id = form.get("id")
        item = await service.add_item(
            namespace, data, filename, metadata, str(item_id) if item_id is not None else None, replace
        )
        return _item_response(item)

    NamespaceQuery = Query(None, description="Default: the server's --namespace.")

    @api.get("/api/v1/items/{item_id:path}/thumbnail", tags=["items"], response_class=Response)
    async def item_thumbnail(
        request: Request,
        item_id: str,
        namespace: str | None = NamespaceQuery,
        size: int = Query(256, description="128, 256 or 512"),
    ):
        """A small JPEG of the item's image (cached)."""
        if not _literal_suffix(request, "thumbnail"):  # the item "…/thumbnail" itself
            return JSONResponse(jsonable_encoder(await get_item(f"{item_id}/thumbnail", namespace)))
        data = await service.run(service.thumbnail, service.namespace_name(namespace), item_id, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/api/v1/items/{item_id:path}/similar", response_model=SearchResponse, tags=["items"])
    async def item_similar(
        request: Request,
        item_id: str,
        namespace: str | None = NamespaceQuery,
        limit: int = Query(10, ge=1, le=1000),
        same_filter: list[str] | None = Query(
            None, description="Only items with the same value of this metadata key as the item (repeatable)."
        ),
    ):
        """Nearest items to this item's image vector, excluding the item itself."""
        if not _literal_suffix(request, "similar"):  # the item "…/similar" itself
            return JSONResponse(jsonable_encoder(await get_item(f"{item_id}/similar", namespace)))
        ns = service.namespace_name(namespace)
        collection = service.collection(ns)
        hits = await service.run(functools.partial(collection.similar, item_id, limit=limit, same_filter=same_filter))
        return _results(ns, hits)

    @api.get("/api/v1/items/{item_id:path}", response_model=ItemResponse, tags=["items"])
    async def get_item(item_id: str, namespace: str | None = NamespaceQuery):
        item = await service.run(service.get_item, service.namespace_name(namespace), item_id)
        return _item_response(item)

    @api.delete("/api/v1/items/{item_id:path}", response_model=DeletedResponse, tags=["items"])
    async def delete_item(item_id: str, namespace: str | None = NamespaceQuery):
        """Delete the item, and its original if it was uploaded here (``file_removed``; an
        ingested photo is the user's own file and stays; ``detail`` says why a file stayed)."""
        ns = service.namespace_name(namespace)
        kept = await service.run(service.delete_item, ns, item_id)
        return {"id": item_id, "namespace": ns, "deleted": True, "file_removed": kept is None, "detail": kept}

    @api.get("/api/v1/duplicates", response_model=DuplicatesResponse, tags=["items"])
    async def duplicates(threshold: float = Query(0.95, ge=0.0, le=1.0), namespace: str | None = NamespaceQuery):
        """Groups of near-identical images: identical bytes first, then close vectors."""
        ns = service.namespace_name(namespace)
        groups = await service.run(service.collection(ns).duplicates, threshold)
        return {
            "namespace": ns,
            "threshold": threshold,
            "groups": [
                {
                    "kind": g.kind,
                    "score": round(g.score, 6),
                    "items": [
                        {"id": it.id, "metadata": it.metadata, "thumbnail_url": _thumbnail_url(it)} for it in g.items
                    ],
                }
                for g in groups
            ],
        }

    @api.get("/api/v1/namespaces", response_model=NamespaceList, tags=["items"])
    async def namespaces():
        infos = await service.run(service.store.namespaces)
        encoder = service.encoder
        return {
            "default": settings.namespace,
            "namespaces": [
                {
                    "name": ns.name,
                    "model": ns.identity.model_id,
                    "backend": ns.identity.backend,
                    "dimensions": ns.identity.dim,
                    "items": ns.items,
                    "failures": ns.failures,
                    "searchable_by_text": encoder is not None and ns.identity.same_space(encoder.identity),
                }
                for ns in infos
            ],
        }

    app.include_router(api)

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
