"""The OpenAI-compatible routes (``/v1/models``, ``/v1/embeddings``) and ``/embed``: texts and
images embedded in the server's batches, which requests share."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..errors import ClipsearchError, UsageError
from .http import ModelNotFoundError, ServiceDep, form_with_file, multipart_body
from .schemas import EmbeddingRequest, EmbeddingResponse, ImageEmbedding, ImageInput, ModelCard, ModelList
from .service import ImageBudget, gather_in_order, labelled

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def list_models(service: ServiceDep):
    encoder = service.ready_encoder()
    card = {"id": service.model_id, "created": service.started_at, "dimensions": encoder.dim}
    return {"object": "list", "data": [card]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"])
async def retrieve_model(service: ServiceDep, model_id: str):
    """The served model (the OpenAI client's ``models.retrieve``); 404 for any other id."""
    encoder = service.ready_encoder()
    if model_id not in service.accepted_models():
        raise ModelNotFoundError(f"this server serves the model {service.model_id!r}, not {model_id!r}")
    return {"id": service.model_id, "created": service.started_at, "dimensions": encoder.dim}


# -- embeddings --------------------------------------------------------------------
@router.post("/v1/embeddings", response_model=EmbeddingResponse, tags=["openai"])
async def create_embeddings(service: ServiceDep, req: EmbeddingRequest):
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
    if len(inputs) > service.settings.max_inputs:
        raise UsageError(f"too many inputs: {len(inputs)} (at most {service.settings.max_inputs} per request)")
    texts: list[tuple[int, str]] = []
    images: list[tuple[int, str]] = []
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            texts.append((i, x))
        elif isinstance(x, ImageInput):
            images.append((i, x.image))
        else:
            texts.append((i, x.text))

    budget = ImageBudget(service.settings.max_request_image_bytes)

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
        return await service.embed_texts([t for _, t in texts], [f"input[{i}]" for i, _ in texts])

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


@router.post(
    "/embed",
    response_model=ImageEmbedding,
    tags=["embeddings"],
    openapi_extra={"requestBody": multipart_body({})},
)
async def embed_upload(service: ServiceDep, request: Request):
    """Embed one uploaded image (a multipart ``file`` or ``image`` field)."""
    encoder = service.ready_encoder()
    _, data, _ = await form_with_file(request, max_fields=5, max_bytes=service.settings.max_image_bytes)
    vector = (await service.embed_images([data]))[0]
    return {"embedding": vector.tolist(), "dimensions": encoder.dim, "model": service.model_id}
