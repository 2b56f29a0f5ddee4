"""Typed request and response bodies of the HTTP API (they also make the OpenAPI docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Scalar = str | int | float | bool
RangeBounds = dict[Literal["gt", "gte", "lt", "lte", "iexact"], str | int | float | list[str]]
# one value, any of a list, or conditions: a range {"width": {"gte": 1000}}, {"taken_at": {"lt":
# "2024-07-01"}}, or text in any case of A-Z {"camera_make": {"iexact": "apple"}}
FilterValue = Scalar | list[Scalar] | RangeBounds
_FILTER_DOC = (
    "Metadata conditions, all of which must hold: a value ({'label': 'cat'}), any of a list "
    "({'label': ['cat', 'dog']}), or a range ({'width': {'gte': 1000}}, {'taken_at': {'gte': '2024-06-01', "
    "'lt': '2024-07-01'}}). Numbers compare as numbers (text that spells one included), other text in "
    "code-point order, so ISO 8601 dates compare by time; a bare date as 'lte' or 'gt' bound covers its whole day. "
    "{'camera_make': {'iexact': 'apple'}} (or a list of texts) is equality of text ignoring the case of A-Z."
)


# Request bodies are typed strictly, on every route: "10" and true are not a limit, 1 is not a
# text. (Query strings are text by nature; ?limit=10 is read as the number it spells.)
STRICT = ConfigDict(extra="forbid", strict=True)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- OpenAI-compatible embeddings ----------------------------------------------------------
class TextInput(BaseModel):
    model_config = STRICT
    text: str


class ImageInput(BaseModel):
    model_config = STRICT
    image: str = Field(description="An http(s) URL, a data: URI, or base64-encoded image bytes.")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True)  # unknown fields pass: OpenAI clients send their own
    input: str | list[str | TextInput | ImageInput] = Field(
        description="A string, a list of strings, or a list of {'text': ...} / {'image': URL|data-URI|base64} items."
    )
    model: str | None = Field(None, description="The served model (see GET /v1/models).")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, as OpenAI sends them."
    )
    dimensions: int | None = Field(None, description="Must equal the model's dimension if given.")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "clipsearch"
    dimensions: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImageEmbedding(BaseModel):
    embedding: list[float]
    dimensions: int
    model: str


# -- health --------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["healthy", "starting", "failed"]
    model: str | None
    device: str | None
    dimensions: int | None
    items: int
    message: str | None = None


# -- search --------------------------------------------------------------------------------
class SearchRequest(BaseModel):
    model_config = STRICT
    text: str = Field(min_length=1, description="What to look for.")
    namespace: str | None = None
    limit: int = Field(10, ge=1, le=1000)
    offset: int = Field(0, ge=0, description="Skip this many of the best: a later page (offset + limit <= 5000).")
    filter: dict[str, FilterValue] | None = Field(None, description=_FILTER_DOC)
    mode: Literal["vector", "keyword", "hybrid"] = Field(
        "vector",
        description="vector: CLIP similarity to the images (cosine scores). keyword: the words of item text and "
        "metadata (BM25 scores; no model needed). hybrid: reciprocal rank fusion of keyword, image-vector and "
        "text-vector rankings (fused-rank scores).",
    )
    add: list[str] = Field(
        default_factory=list, description="Texts whose vectors are added to the query's (vector mode; '2:sunset')."
    )
    subtract: list[str] = Field(
        default_factory=list, description="Texts whose vectors are subtracted from the query's (vector mode)."
    )


class VectorSearchRequest(BaseModel):
    model_config = STRICT
    embedding: list[float] = Field(min_length=1)
    namespace: str | None = None
    limit: int = Field(10, ge=1, le=1000)
    offset: int = Field(0, ge=0, description="Skip this many of the best: a later page (offset + limit <= 5000).")
    filter: dict[str, FilterValue] | None = Field(None, description=_FILTER_DOC)


class ImageSearchRequest(BaseModel):
    model_config = STRICT
    image: str = Field(description="An http(s) URL, a data: URI, or base64-encoded image bytes.")
    namespace: str | None = None
    limit: int = Field(10, ge=1, le=1000)
    offset: int = Field(0, ge=0, description="Skip this many of the best: a later page (offset + limit <= 5000).")
    filter: dict[str, FilterValue] | None = Field(None, description=_FILTER_DOC)


class SearchResult(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any]
    thumbnail_url: str


class SearchResponse(BaseModel):
    namespace: str
    results: list[SearchResult]
    offset: int = 0
    next_offset: int | None = Field(
        None, description="The offset of the next page; null after the last page (a short one, or 5000 reached)."
    )


class BrowseItem(BaseModel):
    id: str
    metadata: dict[str, Any]
    thumbnail_url: str


class BrowseResponse(BaseModel):
    namespace: str
    total: int = Field(description="How many items pass the filter and folder, in all.")
    offset: int
    next_offset: int | None = Field(None, description="The offset of the next page; null after the last.")
    items: list[BrowseItem]


class KeyCount(BaseModel):
    key: str
    items: int
    kinds: dict[str, int] = Field(description="Items by the kind of value: number, text, bool, null, list, object.")


class KeyList(BaseModel):
    namespace: str
    keys: list[KeyCount]


class ValueCount(BaseModel):
    value: Scalar | None = Field(description="null: the items without the key")
    items: int


class ValueList(BaseModel):
    namespace: str
    key: str
    values: list[ValueCount]


class FolderCount(BaseModel):
    folder: str
    items: int


class FolderList(BaseModel):
    namespace: str
    folders: list[FolderCount]


# -- items ---------------------------------------------------------------------------------
class ItemResponse(BaseModel):
    id: str
    namespace: str
    metadata: dict[str, Any]
    created_at: str
    updated_at: str
    thumbnail_url: str


class DeletedResponse(BaseModel):
    id: str
    namespace: str
    deleted: bool
    file_removed: bool = Field(description="Whether the uploaded original was removed from disk.")
    detail: str | None = Field(None, description="Why no file was removed, when none was.")


class DuplicateItem(BaseModel):
    id: str
    metadata: dict[str, Any]
    thumbnail_url: str


class DuplicateGroupModel(BaseModel):
    kind: Literal["exact", "near"]
    score: float
    items: list[DuplicateItem]


class DuplicatesResponse(BaseModel):
    namespace: str
    threshold: float
    groups: list[DuplicateGroupModel]


class NamespaceModel(BaseModel):
    name: str
    model: str
    backend: str
    dimensions: int
    items: int
    failures: int
    searchable_by_text: bool = Field(description="True when the served model made this namespace's vectors.")


class NamespaceList(BaseModel):
    default: str
    namespaces: list[NamespaceModel]
