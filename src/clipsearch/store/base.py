"""The store interface: what ingest, search and the API need from a vector database.

A store keeps, per namespace, the model identity that produced its vectors, the items
(id, metadata, content hash, vector) and the failures. It also owns nearest-neighbour search,
because each backend does it differently (FAISS beside SQLite, SQL on pgvector).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import DimensionError, ModelMismatchError, UsageError
from ..filters import Range, as_number, filter_folded, filter_ranges, filter_values, fold, typed_variants
from ..identity import ModelIdentity

if TYPE_CHECKING:
    from ..index import IndexSettings

__all__ = ["Range", "as_number", "filter_folded", "filter_ranges", "filter_values", "fold", "typed_variants"]

DEFAULT_NAMESPACE = "default"
# what a photo's EXIF says (imaging.photo_facts); stored when present
PHOTO_KEYS = ("taken_at", "camera_make", "camera_model", "gps_lat", "gps_lon")
# metadata the pipeline derives from the image itself; kept when a source updates the rest
DERIVED_KEYS = ("namespace", "width", "height", "sha256", "bytes", *PHOTO_KEYS)
# metadata that is no use to keyword search (digests, sizes, dates, locations)
_NOT_KEYWORDS = frozenset(
    {*DERIVED_KEYS, "type", "extension", "path", "url", "catalog", "catalog_path", "image_list"}
    - {"camera_make", "camera_model"}
)
# the kinds of metadata values (Store.metadata_keys)
KEY_KINDS = ("number", "text", "bool", "null", "list", "object")
# browse orders: newest (or oldest) stored first, or by the date a photo was taken, newest first
BROWSE_ORDERS = ("newest", "oldest", "taken")
FIELDS = ("image", "text")  # which vectors of an item a search runs over
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# -- rules every store applies the same way ---------------------------------------------------
def validate_namespace(name: str) -> str:
    if not _NAMESPACE_RE.match(name or ""):
        raise UsageError(
            f"bad namespace {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def check_item_id(item_id: str) -> str:
    """An id a client may give an item: 1-200 characters, no white space at either end, no
    control characters (PostgreSQL's text cannot hold NUL), and no ``.`` or ``..`` part, which
    a URL client removes (RFC 3986), so that ``/api/v1/items/{id}`` reaches every stored item."""
    if not 0 < len(item_id) <= 200 or item_id.strip() != item_id:
        raise UsageError("id must be 1-200 characters without leading or trailing spaces", param="id")
    if any(ord(c) < 32 or ord(c) == 127 for c in item_id):
        raise UsageError("id must not hold control characters", param="id")
    if {".", ".."} & set(item_id.split("/")):
        raise UsageError(f"id {item_id!r} has a '.' or '..' part, which no URL can reach", param="id")
    return item_id


def check_same_model(namespace: str, existing: ModelIdentity, requested: ModelIdentity) -> None:
    """Refuse to mix two models' vectors in one namespace."""
    if not existing.same_space(requested):
        raise ModelMismatchError(namespace, existing, requested)


def with_derived(
    metadata: dict[str, Any],
    *,
    namespace: str,
    width: int,
    height: int,
    sha256: str,
    size: int,
    photo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An image's metadata as stored: what its source says, plus what decoding found
    (``DERIVED_KEYS``: sizes, digest, and the ``photo`` facts of its EXIF). Every path that stores
    a decoded image builds its row's metadata here."""
    derived = {"namespace": namespace, "width": width, "height": height, "sha256": sha256, "bytes": size}
    return {**metadata, **derived, **{k: photo[k] for k in PHOTO_KEYS if photo and photo.get(k) is not None}}


def keep_derived(metadata: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """A source's new metadata for an item whose bytes did not change: what decoding derived
    stays, except a photo fact the source itself now gives (a catalog's own ``taken_at``)."""
    kept = {k: stored[k] for k in DERIVED_KEYS if k in stored and not (k in PHOTO_KEYS and k in metadata)}
    return {**metadata, **kept}


def check_field(field: str) -> str:
    if field not in FIELDS:
        raise UsageError(f"unknown vector field {field!r}; use {' or '.join(FIELDS)}")
    return field


def checked_queries(namespace: str, dim: int, queries: np.ndarray) -> np.ndarray:
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.shape[1] != dim:
        raise DimensionError(
            f"query vector has {queries.shape[1]} dimensions; namespace {namespace!r} holds {dim}-d vectors"
        )
    return queries


def checked_batch(
    namespace: str, dim: int, items: list[NewItem], vectors: np.ndarray, touched: list[NewItem]
) -> np.ndarray:
    """``vectors`` as float32, after checking it and every text vector against ``dim``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(items) != len(vectors):
        raise ValueError("items and vectors differ in length")
    checks = [(vectors, "vectors")]
    checks += [
        (np.atleast_2d(it.text_vector), "text vectors") for it in (*items, *touched) if it.text_vector is not None
    ]
    for matrix, what in checks:
        if len(matrix) and matrix.shape[1] != dim:
            raise DimensionError(f"{what} have {matrix.shape[1]} dimensions; namespace {namespace!r} holds {dim}")
    return vectors


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def claim_owner() -> str:
    """Who holds a claim: host and process, so that a process on the same host can tell the
    holder died and take its claims over at once instead of waiting for them to expire."""
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_owners(owners: list[str]) -> list[str]:
    """The owners among ``owners`` that are processes of this host that no longer run."""
    host = socket.gethostname()
    dead = []
    for owner in owners:
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                dead.append(owner)
            except PermissionError:
                pass  # alive, another user's
    return dead


@dataclass
class NamespaceInfo:
    name: str
    identity: ModelIdentity
    model_spec: dict[str, Any]  # how to load the model again: model, pretrained, weights
    items: int = 0
    failures: int = 0
    created_at: str = ""


def check_browse(order: str, offset: int, limit: int) -> None:
    if order not in BROWSE_ORDERS:
        raise UsageError(f"unknown order {order!r}; use {', '.join(BROWSE_ORDERS)}", param="order")
    if offset < 0:
        raise UsageError(f"offset must be 0 or more, not {offset}", param="offset")
    if limit < 1:
        raise UsageError("limit must be at least 1", param="limit")


def like_prefix(folder: str) -> str:
    """A LIKE pattern (escape character ``\\``) for the paths inside ``folder``."""
    folder = folder.rstrip("/\\") + "/"
    return folder.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def folder_of(path: Any) -> str | None:
    """The folder of an item's file (its ``path`` metadata), or None for an item without one."""
    if not isinstance(path, str) or not path:
        return None
    return os.path.dirname(path) or None


def folder_names(path: Any, depth: int = 2) -> tuple[str, ...]:
    """The names of the last ``depth`` folders of ``path`` (a file's own folder last)."""
    folder = folder_of(path)
    if folder is None:
        return ()
    names = [n for n in folder.replace("\\", "/").split("/") if n]
    return tuple(names[-depth:])


def keyword_text(metadata: dict[str, Any]) -> str:
    """The words of an item's metadata that keyword search indexes: its text values (lists
    included), without digests, sizes, paths and URLs, and the names of the two folders its
    file sits in (``holiday/red_circle/003.png``: holiday, red, circle)."""
    parts: list[str] = list(folder_names(metadata.get("path")))
    for key, value in metadata.items():
        if key in _NOT_KEYWORDS:
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v and not v[:8].lower().startswith(("http://", "https://")):
                parts.append(v)
    return " ".join(parts)


@dataclass
class FileState:
    """What the store remembers of a source item, to skip it cheaply next time."""

    sha256: str | None
    size: int | None
    mtime_ns: int | None
    fingerprint: str | None = None
    reason: str | None = None  # failures only


@dataclass
class NewItem:
    id: str
    metadata: dict[str, Any]
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    fingerprint: str | None = None
    text: str | None = None
    text_vector: np.ndarray | None = None  # the text tower's vector of ``text`` (--embed-text)


@dataclass
class FailureRecord:
    id: str
    source: str
    reason: str
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None


@dataclass
class Failure(FailureRecord):
    namespace: str = DEFAULT_NAMESPACE
    attempts: int = 1
    first_failed_at: str = ""
    last_failed_at: str = ""


@dataclass
class Item:
    id: str
    namespace: str
    metadata: dict[str, Any]
    sha256: str | None = None
    created_at: str = ""
    updated_at: str = ""

    @property
    def path(self) -> str | None:
        """Where the image is: its file, else its URL (catalog items), else None (uploads kept
        elsewhere)."""
        where = self.metadata.get("path") or self.metadata.get("url")
        return str(where) if where else None

    def __repr__(self) -> str:
        # what a person looks for in a notebook; the digest and timestamps are fields still
        return f"Item(id={self.id!r}, path={self.path!r})"


@dataclass
class Hit:
    """A search result: the item and its score (a cosine for vector search, higher is closer)."""

    item: Item
    score: float

    @property
    def id(self) -> str:
        return self.item.id

    @property
    def metadata(self) -> dict[str, Any]:
        return self.item.metadata

    @property
    def path(self) -> str | None:
        """Where the image is: its file, else its URL (catalog items), else None (uploads kept
        elsewhere)."""
        return self.item.path

    def __repr__(self) -> str:
        return f"Hit(score={self.score:.4f}, id={self.id!r}, path={self.path!r})"

    # a mapping, so that ``dict(hit)`` (and a DataFrame of hits) reads as a row
    _KEYS = ("id", "score", "path", "metadata")

    def keys(self) -> tuple[str, ...]:
        return self._KEYS

    def __getitem__(self, key: str) -> Any:
        if key not in self._KEYS:
            raise KeyError(key)
        return getattr(self, key)


@dataclass
class IndexStatus:
    kind: str  # flat | hnsw | ivfpq | none
    fresh: bool
    vectors: int  # searchable vectors
    tombstones: int = 0  # removed vectors an HNSW graph still holds (until `index build` compacts it)
    reason: str = ""  # why this kind
    memory: int = 0  # bytes the index holds in memory (an estimate)
    lists: int = 0  # IVF-PQ's lists
    unpurged: int = 0  # rows deleted (skipped by every read) whose space `index build` reclaims (SQLite)
    search: str = ""  # what an unfiltered query does: "efSearch 807", "384 lists visited, 1,019 candidates re-ranked"
    id_map: int = 0  # ids in the id map a delete of 5,000 or more reads (SQLite; 0: none, until `index build`)


class Store(Protocol):
    """Backend-neutral store; every method is safe to call from one thread at a time."""

    location: str
    index_settings: IndexSettings  # the index part of the settings it was opened with

    # -- namespaces --------------------------------------------------------------------
    def namespace(self, name: str) -> NamespaceInfo | None:
        """The namespace with its item and failure counts (counting is a scan)."""
        ...

    def identity(self, name: str) -> ModelIdentity | None:
        """The model identity of a namespace, without counting anything: for every request."""
        ...

    def namespaces(self) -> list[NamespaceInfo]: ...
    def bind_namespace(self, name: str, identity: ModelIdentity, model_spec: dict[str, Any]) -> NamespaceInfo:
        """Create the namespace for this model, or check that it already holds this model's
        vectors (raise ModelMismatchError otherwise)."""
        ...

    # -- writing -----------------------------------------------------------------------
    def file_states(self, namespace: str, ids: list[str]) -> dict[str, FileState]: ...
    def failure_states(self, namespace: str, ids: list[str]) -> dict[str, FileState]: ...
    def write_batch(
        self,
        namespace: str,
        items: list[NewItem],
        vectors: np.ndarray,
        failures: list[FailureRecord] = (),  # type: ignore[assignment]
        touched: list[NewItem] = (),  # type: ignore[assignment]
    ) -> None:
        """Atomically upsert items with their vectors (and text vectors), record failures, and
        refresh unchanged items in ``touched``: their file state, fingerprint, text and source
        metadata (the ``DERIVED_KEYS`` already stored are kept), but not their image vector."""
        ...

    def delete_items(self, namespace: str, ids: list[str]) -> int: ...

    def claim(self, namespace: str, ids: list[str], owner: str, lease_seconds: float = 600) -> set[str]:
        """Claim items for one ingest process: the ids no live process holds. Several processes
        ingesting the same source into one namespace thereby share the work."""
        ...

    def release(self, namespace: str, owner: str) -> None: ...

    # -- reading -----------------------------------------------------------------------
    def get_items(self, namespace: str, ids: list[str]) -> list[Item]: ...
    def get_vectors(self, namespace: str, ids: list[str]) -> dict[str, np.ndarray]: ...
    def count(self, namespace: str) -> int: ...
    def failures(self, namespace: str | None = None) -> list[Failure]: ...
    def iter_vectors(self, namespace: str, batch_size: int = 10_000) -> Iterator[tuple[list[Item], np.ndarray]]:
        """All items with their vectors, in a stable (insertion) order."""
        ...

    def iter_items(self, namespace: str, batch_size: int = 10_000) -> Iterator[list[Item]]:
        """All items without their vectors (a tenth of the bytes), in the same order."""
        ...

    def hash_groups(self, namespace: str) -> list[list[Item]]:
        """Groups of two or more items whose content hashes are equal."""
        ...

    def count_by(self, namespace: str, key: str) -> list[tuple[Any, int]]:
        """(value, items) for each value of metadata ``key`` (each element of a list value),
        most items first, then (None, items without the key), if any."""
        ...

    def metadata_keys(self, namespace: str, exact: bool = True) -> dict[str, dict[str, int]]:
        """Each metadata key of the namespace's items: how many items have it, by the kind of
        value (``KEY_KINDS``). ``exact=False`` may also count items deleted and not yet purged
        (SQLite), which costs nothing to leave in: for a caller that asks which keys there are."""
        ...

    def list_items(
        self,
        namespace: str,
        *,
        offset: int = 0,
        limit: int = 40,
        filters: dict[str, Any] | None = None,
        order: str = "newest",
        folder: str | None = None,
    ) -> tuple[list[Item], int]:
        """A page of the items that pass ``filters`` (and sit in ``folder`` or below it), in
        ``order`` (``BROWSE_ORDERS``), and how many pass in all."""
        ...

    # -- search ------------------------------------------------------------------------
    def prepare_search(self, namespace: str, field: str = "image") -> None:
        """Load what a search of ``field`` vectors needs (an index file), so that a caller can
        do it while something else loads; a search does it anyway."""
        ...

    def keep_resident(self, namespace: str, field: str = "image") -> None:
        """``prepare_search``, and with ``CLIPSEARCH_LOCK_VECTORS`` return once the vectors a
        search reads are locked in memory (``prepare_search`` and searches start that, and go on
        meanwhile); MemoryLockError where the system refuses."""
        ...

    def search(
        self,
        namespace: str,
        queries: np.ndarray,
        k: int,
        filters: dict[str, Any] | None = None,
        field: str = "image",
    ) -> list[list[Hit]]:
        """Nearest items by inner product over their image vectors, or their text vectors."""
        ...

    def keyword_search(self, namespace: str, query: str, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        """Items whose text or metadata contain the query's words, best (BM25) first."""
        ...

    def has_text_vectors(self, namespace: str) -> bool: ...
    def index_status(self, namespace: str) -> IndexStatus: ...
    def build_index(self, namespace: str, kind: str | None = None) -> IndexStatus:
        """Bring the vector index up to date; ``kind`` forces one (``hnsw``, or ``auto``: chosen
        by size again, as `index build` asks), None (an ingest's refresh) lets the store choose by
        size and keeps what is up to date (on SQLite the id map, rewritten only when there is
        none or a quarter of the live ids have changed since it)."""
        ...

    def schema_version(self) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> Store: ...
    def __exit__(self, *exc: object) -> None: ...


class ClosingStore:
    """Makes a store a context manager that closes it."""

    def close(self) -> None:  # pragma: no cover - every store defines its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
