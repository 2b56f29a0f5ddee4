"""The search routes: by text (vector, keyword, hybrid), by raw vector and by image. Each is a
namespace's ``Collection.plan_search`` (the rules and the model check), the embedding in the
server's batches, then ``Collection.finish_search``."""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .http import ServiceDep, form_with_file, json_body, json_field, multipart_body, results
from .schemas import ImageSearchRequest, SearchRequest, SearchResponse, VectorSearchRequest

router = APIRouter()


@router.post("/api/v1/search", response_model=SearchResponse, tags=["search"])
async def search_text(service: ServiceDep, req: SearchRequest):
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
            offset=req.offset,
        )
    )
    texts = (await service.embed_texts(plan.texts))[0] if plan.texts else None
    return results(namespace, await service.run(collection.finish_search, plan, texts), req.offset, req.limit)


@router.post("/api/v1/vectors/search", response_model=SearchResponse, tags=["search"])
async def search_by_vector(service: ServiceDep, req: VectorSearchRequest):
    """Nearest items to a raw vector (it is L2-normalised first)."""
    namespace = service.namespace_name(req.namespace)
    collection = service.collection(namespace)
    plan = await service.run(
        functools.partial(
            collection.plan_search, vector=req.embedding, limit=req.limit, filter=req.filter, offset=req.offset
        )
    )
    return results(namespace, await service.run(collection.finish_search, plan), req.offset, req.limit)


@router.post(
    "/api/v1/images/search",
    response_model=SearchResponse,
    tags=["search"],
    openapi_extra={
        "requestBody": multipart_body(
            {
                "namespace": {"type": "string"},
                "limit": {"type": "integer", "default": 10},
                "offset": {"type": "integer", "default": 0},
                "filter": {"type": "string", "description": "the filter object, as JSON"},
            },
            also={"application/json": {"schema": ImageSearchRequest.model_json_schema()}},
        )
    },
)
async def search_by_image(service: ServiceDep, request: Request):
    """Image → image search: a multipart ``file``, or JSON ``{"image": URL | data-URI}``."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form, data, _ = await form_with_file(request, max_fields=20, max_bytes=service.settings.max_image_bytes)
        fields: dict[str, Any] = {
            k: form.get(k)
            for k in ("namespace", "limit", "offset", "filter")
            if isinstance(form.get(k), str) and form.get(k)
        }
        if "filter" in fields:
            fields["filter"] = json_field("filter", fields["filter"])
        # a form's fields are text by nature, as a query string's: "limit=2" is the number it spells
        for number in ("limit", "offset"):
            if number in fields and fields[number].strip().isdigit():
                fields[number] = int(fields[number])
        payload: Any = {"image": "-", **fields}
    else:
        payload = await json_body(request)
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
        functools.partial(collection.plan_search, image=data, limit=req.limit, filter=req.filter, offset=req.offset)
    )
    vector = (await service.embed_images([data]))[0]
    return results(namespace, await service.run(collection.finish_search, plan, None, vector), req.offset, req.limit)
