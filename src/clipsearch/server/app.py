"""The FastAPI application: routes, API-key check, request size limit and JSON errors.

Routes translate HTTP to ``Service`` calls and back. Every error leaves as
``{"error": {"message", "type", ...}}`` with its status: 400 bad input, 401 API key, 404,
413 too large, 422 validation, 503 while the model loads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
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
    ModelList,
    NamespaceList,
    SearchRequest,
    SearchResponse,
    VectorSearchRequest,
)
from .service import (
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
_RESERVED_FORM_FIELDS = {"file", "namespace", "id", "metadata"}


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
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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
    )
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)

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
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error_response(422, "; ".join(parts) or "invalid request", "invalid_request_error", "validation_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = str(e.detail)
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

    # -- health and models -------------------------------------------------------------
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

    def served_names() -> set[str]:
        encoder = service.ready_encoder()
        return {encoder.model_id, encoder.identity.model}

    @api.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def list_models():
        encoder = service.ready_encoder()
        card = {"id": encoder.model_id, "created": service.started_at, "dimensions": encoder.dim}
        return {"object": "list", "data": [card]}

    # -- embeddings --------------------------------------------------------------------
    @api.post("/v1/embeddings", response_model=EmbeddingResponse, tags=["openai"])
    async def create_embeddings(req: EmbeddingRequest):
        """OpenAI-compatible embeddings of texts and images in one vector space."""
        encoder = service.ready_encoder()
        if req.model and req.model not in served_names():
            raise ModelNotFoundError(
                f"this server serves the model {encoder.model_id!r}, not {req.model!r}; use model={encoder.model_id!r}"
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

        async def fetch(i: int, ref: str) -> bytes:
            try:
                return await service.image_bytes(ref)
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
            "model": encoder.model_id,
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
        """A multipart form whose ``file`` field holds one image: (form, image bytes, file name)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise UsageError("send a multipart form with the image in a field named 'file'")
        form = await request.form(max_files=1, max_fields=max_fields)
        upload = form.get("file")
        if not isinstance(upload, StarletteUploadFile):
            raise UsageError("send the image as a multipart file field named 'file'")
        return form, await _read_upload(upload), upload.filename

    @api.post("/embed", response_model=ImageEmbedding, tags=["embeddings"])
    async def embed_upload(file: UploadFile = File(..., description="An image file.")):
        """Embed one uploaded image."""
        encoder = service.ready_encoder()
        vector = (await service.embed_images([await _read_upload(file)]))[0]
        return {"embedding": vector.tolist(), "dimensions": encoder.dim, "model": encoder.model_id}

    # -- search ------------------------------------------------------------------------
    @api.post("/api/v1/search", response_model=SearchResponse, tags=["search"])
    async def search_text(req: SearchRequest):
        """Text → image search: by CLIP vector, by keyword, or both fused (``mode``)."""
        namespace = service.namespace_name(req.namespace)
        vector = None
        if req.mode != "keyword":
            await service.run(service.check_searchable, namespace)
            vector = (await service.embed_texts([req.text]))[0][0]
        hits = await service.run(service.search_text, namespace, req.text, vector, req.limit, req.filter, req.mode)
        return _results(namespace, hits)

    @api.post("/api/v1/vectors/search", response_model=SearchResponse, tags=["search"])
    async def search_by_vector(req: VectorSearchRequest):
        """Nearest items to a raw vector (it is L2-normalised first)."""
        namespace = service.namespace_name(req.namespace)
        return _results(namespace, await service.run(service.search, namespace, req.embedding, req.limit, req.filter))

    @api.post(
        "/api/v1/images/search",
        response_model=SearchResponse,
        tags=["search"],
        openapi_extra={
            "requestBody": _multipart_body(
                {"namespace": {"type": "string"}, "limit": {"type": "integer", "default": 10}},
                also={"application/json": {"schema": ImageSearchRequest.model_json_schema()}},
            )
        },
    )
    async def search_by_image(request: Request):
        """Image → image search: a multipart ``file``, or JSON ``{"image": URL | data-URI}``."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form, data, _ = await _form_with_file(request, max_fields=20)
            try:
                limit = int(str(form.get("limit") or 10))
            except ValueError:
                raise UsageError("limit must be an integer") from None
            if not 1 <= limit <= 1000:
                raise UsageError("limit must be between 1 and 1000")
            namespace_field = form.get("namespace")
            req = ImageSearchRequest(
                image="-", namespace=str(namespace_field) if namespace_field else None, limit=limit
            )
        else:
            try:
                payload = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UsageError(
                    "send a multipart form with a 'file' field, or a JSON body {\"image\": URL | data-URI}"
                ) from None
            try:
                req = ImageSearchRequest.model_validate(payload)
            except ValidationError as e:
                raise RequestValidationError(e.errors()) from None
            data = await service.image_bytes(req.image)
        namespace = service.namespace_name(req.namespace)
        await service.run(service.check_searchable, namespace)
        vector = (await service.embed_images([data]))[0]
        return _results(namespace, await service.run(service.search, namespace, vector, req.limit, req.filter))

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
    async def add_item(request: Request):
        """Store and index an uploaded image; other form fields become its metadata."""
        form, data, filename = await _form_with_file(request, max_fields=200)
        metadata: dict[str, Any] = {}
        raw_meta = form.get("metadata")
        if raw_meta:
            try:
                parsed = json.loads(str(raw_meta))
            except json.JSONDecodeError:
                raise UsageError("the 'metadata' field must be a JSON object") from None
            if not isinstance(parsed, dict):
                raise UsageError("the 'metadata' field must be a JSON object")
            metadata.update(parsed)
        for key, value in form.multi_items():
            if key not in _RESERVED_FORM_FIELDS and isinstance(value, str):
                metadata[key] = value
        namespace = service.namespace_name(str(form.get("namespace") or "") or None)
        item_id = form.get("id")
        item = await service.add_item(
            namespace, data, filename, metadata, str(item_id) if item_id is not None else None
        )
        return _item_response(item)

    NamespaceQuery = Query(None, description="Default: the server's --namespace.")

    @api.get("/api/v1/items/{item_id:path}/thumbnail", tags=["items"], response_class=Response)
    async def item_thumbnail(
        item_id: str, namespace: str | None = NamespaceQuery, size: int = Query(256, description="128, 256 or 512")
    ):
        """A small JPEG of the item's image (cached)."""
        data = await service.run(service.thumbnail, service.namespace_name(namespace), item_id, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/api/v1/items/{item_id:path}/similar", response_model=SearchResponse, tags=["items"])
    async def item_similar(
        item_id: str,
        namespace: str | None = NamespaceQuery,
        limit: int = Query(10, ge=1, le=1000),
        same_filter: list[str] | None = Query(
            None, description="Only items with the same value of this metadata key as the item (repeatable)."
        ),
    ):
        """Nearest items to this item's image vector, excluding the item itself."""
        ns = service.namespace_name(namespace)
        return _results(ns, await service.run(service.similar, ns, item_id, limit, same_filter))

    @api.get("/api/v1/items/{item_id:path}", response_model=ItemResponse, tags=["items"])
    async def get_item(item_id: str, namespace: str | None = NamespaceQuery):
        item = await service.run(service.get_item, service.namespace_name(namespace), item_id)
        return _item_response(item)

    @api.delete("/api/v1/items/{item_id:path}", response_model=DeletedResponse, tags=["items"])
    async def delete_item(item_id: str, namespace: str | None = NamespaceQuery):
        ns = service.namespace_name(namespace)
        await service.run(service.delete_item, ns, item_id)
        return {"id": item_id, "namespace": ns, "deleted": True}

    @api.get("/api/v1/duplicates", response_model=DuplicatesResponse, tags=["items"])
    async def duplicates(threshold: float = Query(0.95, ge=0.0, le=1.0), namespace: str | None = NamespaceQuery):
        """Groups of near-identical images: identical bytes first, then close vectors."""
        ns = service.namespace_name(namespace)
        groups = await service.run(service.duplicates, ns, threshold)
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

    # -- gallery -----------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def gallery():
        return FileResponse(str(GALLERY / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(GALLERY)), name="static")
    return app
