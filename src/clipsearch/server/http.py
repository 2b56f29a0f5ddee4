"""What the routes share: reading requests (JSON bodies and fields, multipart uploads, raw
paths) and writing answers (search results, items), and the service each route is given."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUploadFile

from ..collection import MAX_RESULTS
from ..errors import ClipsearchError, ImageError, NotFoundError, TooLargeError, UsageError
from ..store import Hit, Item
from .schemas import ItemResponse, SearchResponse
from .service import Service

IMAGE_FIELDS = ("file", "image")  # the form field of an uploaded image: either name


def _service(request: Request) -> Service:
    return request.app.state.service


# a route's service: ``service: ServiceDep``
ServiceDep = Annotated[Service, Depends(_service)]
NamespaceQuery = Query(None, description="Default: the server's --namespace.")


TOO_DEEP = "the request body's JSON is nested too deeply to parse; send at most a few hundred levels"


def _not_json(what: str, position: int | None) -> str:
    """The one wording of a body that is not JSON: where and what."""
    where = "" if position is None else f" at character {position}"
    return f"the request body is not valid JSON{where}: {what}"


def json_error_message(err: dict[str, Any]) -> str:
    """``_not_json`` for FastAPI's own parse error (which says only "JSON decode error")."""
    loc = err.get("loc", ())
    what = str((err.get("ctx") or {}).get("error") or "not valid JSON")
    return _not_json(what, loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None)


async def json_body(request: Request) -> Any:
    """A route's own JSON parsing, worded as FastAPI's is (400, where and what)."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadJSON(TOO_DEEP) from None
    except UnicodeDecodeError:
        raise BadJSON("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadJSON(_not_json(e.msg, e.pos)) from None


def json_field(name: str, raw: str) -> Any:
    """A form field that carries a JSON object (``filter``, ``metadata``)."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise UsageError(f"the {name!r} field must be a JSON object")
    return parsed


class BadJSON(ClipsearchError):
    """A body that is not JSON (HTTP 400)."""


def literal_suffix(request: Request, suffix: str) -> bool:
    """Whether the request path ends in ``/suffix`` written as such: an item id containing a
    slash is sent encoded (``x%2Fthumbnail``), and Starlette decodes it before routing, so only
    the raw path tells ``GET …/x%2Fthumbnail`` (the item ``x/thumbnail``) from ``…/x/thumbnail``."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    return raw.split(b"?", 1)[0].rstrip(b"/").endswith(b"/" + suffix.encode())


class ModelNotFoundError(NotFoundError):
    """A request named a model this server does not serve."""


def thumbnail_url(item: Item) -> str:
    return f"/api/v1/items/{quote(item.id, safe='')}/thumbnail?namespace={quote(item.namespace, safe='')}"


def item_summary(item: Item) -> dict[str, Any]:
    """An item as lists of items show it (browse, duplicate groups): id, metadata, thumbnail."""
    return {"id": item.id, "metadata": item.metadata, "thumbnail_url": thumbnail_url(item)}


def results(namespace: str, hits: list[Hit], offset: int = 0, limit: int | None = None) -> SearchResponse:
    """A search's page; ``limit``: what was asked for, so that a full page within the depth
    limit says where the next one starts."""
    end = offset + len(hits)
    more = limit is not None and len(hits) == limit and end < MAX_RESULTS
    return SearchResponse.model_validate(
        {
            "namespace": namespace,
            "offset": offset,
            "next_offset": end if more else None,
            "results": [
                {
                    "id": h.item.id,
                    "score": round(h.score, 6),
                    "metadata": h.item.metadata,
                    "thumbnail_url": thumbnail_url(h.item),
                }
                for h in hits
            ],
        }
    )


def item_response(item: Item) -> ItemResponse:
    return ItemResponse(
        id=item.id,
        namespace=item.namespace,
        metadata=item.metadata,
        created_at=item.created_at,
        updated_at=item.updated_at,
        thumbnail_url=thumbnail_url(item),
    )


def multipart_body(properties: dict[str, Any], also: dict[str, Any] | None = None, **schema: Any) -> dict[str, Any]:
    """OpenAPI request body of a multipart form with an image ``file`` (for routes that parse the
    form themselves, so FastAPI cannot describe it); ``also`` adds other content types."""
    fields = {"file": {"type": "string", "format": "binary"}, **properties}
    form = {"schema": {"type": "object", "required": ["file"], "properties": fields, **schema}}
    return {"required": True, "content": {"multipart/form-data": form, **(also or {})}}


async def read_upload(upload: StarletteUploadFile, max_bytes: int) -> bytes:
    """An uploaded image's bytes, at most ``max_bytes`` (else 413), not empty."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLargeError(f"image is larger than the {max_bytes / 1024 / 1024:g} MiB limit")
    if not data:
        raise ImageError("the uploaded file is empty")
    return data


async def form_with_file(request: Request, max_fields: int, max_bytes: int) -> tuple[FormData, bytes, str | None]:
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
    uploads = [form.get(name) for name in IMAGE_FIELDS if form.get(name) is not None]
    if len(uploads) > 1:
        raise UsageError("send the image in one field, 'file' or 'image', not both")
    upload = uploads[0] if uploads else None
    if not isinstance(upload, StarletteUploadFile):
        raise missing
    return form, await read_upload(upload, max_bytes), upload.filename
