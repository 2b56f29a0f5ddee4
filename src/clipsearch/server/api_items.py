"""The item routes: upload, read, thumbnail, similar, delete, duplicates and the namespaces."""

from __future__ import annotations

import functools
import mimetypes
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse, Response

from .http import (
    NamespaceQuery,
    ServiceDep,
    form_with_file,
    item_response,
    item_summary,
    json_field,
    literal_suffix,
    multipart_body,
    results,
)
from .schemas import (
    BrowseResponse,
    DeletedResponse,
    DuplicatesResponse,
    FolderList,
    ItemResponse,
    KeyList,
    NamespaceList,
    SearchResponse,
    ValueList,
)

# form fields of an upload that are not metadata
RESERVED_FORM_FIELDS = {"file", "image", "namespace", "id", "metadata"}

router = APIRouter()


@router.post(
    "/api/v1/items",
    response_model=ItemResponse,
    status_code=201,
    tags=["items"],
    openapi_extra={
        "requestBody": multipart_body(
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
    service: ServiceDep,
    request: Request,
    replace: bool = Query(False, description="Replace an existing item with this id (else 409)."),
):
    """Store and index an uploaded image; other form fields become its metadata. An id that
    exists is refused with 409 unless ``?replace=true``."""
    form, data, filename = await form_with_file(request, max_fields=200, max_bytes=service.settings.max_image_bytes)
    metadata: dict[str, Any] = {}
    raw_meta = form.get("metadata")
    if raw_meta:
        metadata.update(json_field("metadata", str(raw_meta)))
    for key, value in form.multi_items():
        if key not in RESERVED_FORM_FIELDS and isinstance(value, str):
            metadata[key] = value
    namespace = service.namespace_name(str(form.get("namespace") or "") or None)
    item_id = form.get("id")
    item = await service.add_item(
        namespace, data, filename, metadata, str(item_id) if item_id is not None else None, replace
    )
    return item_response(item)


@router.get("/api/v1/items", response_model=BrowseResponse, tags=["items"])
async def browse(
    service: ServiceDep,
    namespace: str | None = NamespaceQuery,
    offset: int = Query(0, ge=0),
    limit: int = Query(40, ge=1, le=1000),
    order: str = Query("newest", description="newest or oldest stored first, or taken: by taken_at, newest first"),
    folder: str | None = Query(None, description="Only the items whose file is in this folder or below it."),
    filter: str | None = Query(None, description="The filter object, as JSON (as the search routes take it)."),
):
    """The stored items without a query, a page at a time."""
    ns = service.namespace_name(namespace)
    conditions = json_field("filter", filter) if filter else None
    page = await service.run(
        functools.partial(
            service.collection(ns).browse, offset=offset, limit=limit, filter=conditions, order=order, folder=folder
        )
    )
    return {
        "namespace": ns,
        "total": page.total,
        "offset": page.offset,
        "next_offset": page.next_offset,
        "items": [item_summary(it) for it in page.items],
    }


@router.get("/api/v1/items/{item_id:path}/original", tags=["items"], response_class=Response)
async def item_original(
    service: ServiceDep,
    request: Request,
    item_id: str,
    namespace: str | None = NamespaceQuery,
    download: bool = Query(False, description="As an attachment (the browser saves it)."),
):
    """The item's image file as stored (the file its ``path`` names: an ingested photo, or an
    upload), for the gallery's viewer to open or save."""
    if not literal_suffix(request, "original"):  # the item "…/original" itself
        return JSONResponse(jsonable_encoder(await get_item(service, f"{item_id}/original", namespace)))
    path = await service.run(service.original, service.namespace_name(namespace), item_id)
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    disposition = "attachment" if download else "inline"
    return FileResponse(
        path,
        media_type=kind,
        filename=path.name,
        content_disposition_type=disposition,
        headers={"Cache-Control": "private, max-age=3600"},
    )


@router.get("/api/v1/items/{item_id:path}/thumbnail", tags=["items"], response_class=Response)
async def item_thumbnail(
    service: ServiceDep,
    request: Request,
    item_id: str,
    namespace: str | None = NamespaceQuery,
    size: int = Query(256, description="128, 256, 512 or 1024"),
):
    """A small JPEG of the item's image (cached)."""
    if not literal_suffix(request, "thumbnail"):  # the item "…/thumbnail" itself
        return JSONResponse(jsonable_encoder(await get_item(service, f"{item_id}/thumbnail", namespace)))
    data = await service.run(service.thumbnail, service.namespace_name(namespace), item_id, size)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/api/v1/items/{item_id:path}/similar", response_model=SearchResponse, tags=["items"])
async def item_similar(
    service: ServiceDep,
    request: Request,
    item_id: str,
    namespace: str | None = NamespaceQuery,
    limit: int = Query(10, ge=1, le=1000),
    same_filter: list[str] | None = Query(
        None, description="Only items with the same value of this metadata key as the item (repeatable)."
    ),
    offset: int = Query(0, ge=0, description="Skip this many of the nearest: a later page."),
    filter: str | None = Query(None, description="The filter object, as JSON (as the search routes take it)."),
):
    """Nearest items to this item's image vector, excluding the item itself."""
    if not literal_suffix(request, "similar"):  # the item "…/similar" itself
        return JSONResponse(jsonable_encoder(await get_item(service, f"{item_id}/similar", namespace)))
    ns = service.namespace_name(namespace)
    collection = service.collection(ns)
    conditions = json_field("filter", filter) if filter else None
    hits = await service.run(
        functools.partial(
            collection.similar, item_id, limit=limit, same_filter=same_filter, offset=offset, filter=conditions
        )
    )
    return results(ns, hits, offset, limit)


@router.get("/api/v1/items/{item_id:path}", response_model=ItemResponse, tags=["items"])
async def get_item(service: ServiceDep, item_id: str, namespace: str | None = NamespaceQuery):
    item = await service.run(service.get_item, service.namespace_name(namespace), item_id)
    return item_response(item)


@router.delete("/api/v1/items/{item_id:path}", response_model=DeletedResponse, tags=["items"])
async def delete_item(service: ServiceDep, item_id: str, namespace: str | None = NamespaceQuery):
    """Delete the item, and its original if it was uploaded here (``file_removed``; an
    ingested photo is the user's own file and stays; ``detail`` says why a file stayed)."""
    ns = service.namespace_name(namespace)
    kept = await service.run(service.delete_item, ns, item_id)
    return {"id": item_id, "namespace": ns, "deleted": True, "file_removed": kept is None, "detail": kept}


@router.get("/api/v1/duplicates", response_model=DuplicatesResponse, tags=["items"])
async def duplicates(
    service: ServiceDep, threshold: float = Query(0.95, ge=0.0, le=1.0), namespace: str | None = NamespaceQuery
):
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
                "items": [item_summary(it) for it in g.items],
            }
            for g in groups
        ],
    }


@router.get("/api/v1/namespaces", response_model=NamespaceList, tags=["items"])
async def namespaces(service: ServiceDep):
    infos = await service.run(service.store.namespaces)
    encoder = service.encoder
    return {
        "default": service.settings.namespace,
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


@router.get("/api/v1/namespaces/{name}/keys", response_model=KeyList, tags=["items"])
async def namespace_keys(service: ServiceDep, name: str):
    """The metadata keys of the namespace's items (what a filter can name), with how many items
    have each."""
    ns = service.namespace_name(name)
    keys = await service.run(service.collection(ns).metadata_keys)
    return {
        "namespace": ns,
        "keys": [{"key": k, "items": sum(kinds.values()), "kinds": kinds} for k, kinds in keys.items()],
    }


@router.get("/api/v1/namespaces/{name}/keys/{key:path}", response_model=ValueList, tags=["items"])
async def namespace_key_values(service: ServiceDep, name: str, key: str, limit: int = Query(20, ge=1, le=1000)):
    """The most common values of one metadata key, with how many items have each (list values
    counted element by element; null: the items without the key)."""
    ns = service.namespace_name(name)
    counts = await service.run(service.collection(ns).count_by_value, key)
    return {"namespace": ns, "key": key, "values": [{"value": v, "items": n} for v, n in counts[:limit]]}


@router.get("/api/v1/namespaces/{name}/folders", response_model=FolderList, tags=["items"])
async def namespace_folders(service: ServiceDep, name: str):
    """The folders that hold the namespace's files, with how many items each holds."""
    ns = service.namespace_name(name)
    folders = await service.run(service.collection(ns).folders)
    return {"namespace": ns, "folders": [{"folder": f, "items": n} for f, n in folders]}
