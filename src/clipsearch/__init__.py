"""clipsearch: self-hosted CLIP embeddings and semantic image search.

The library is ``clipsearch.open(db, namespace, ...) -> Collection``; the command line, the HTTP
server, the table worker and Ray ingest are callers of it. Data flows one way: sources ->
decoding -> encoders -> store / index -> collection -> CLI / server / worker / Ray.

    import clipsearch

    with clipsearch.open("photos.db") as photos:
        photos.ingest(["~/Pictures"])
        hits = photos.search("a dog on a beach", limit=5)
"""

__version__ = "0.1.0"

from .collection import Collection, CollectionInfo, ModelChoice, describe, open
from .errors import (
    ClipsearchError,
    DeviceUnavailableError,
    DimensionError,
    FetchError,
    ImageError,
    ItemNotFoundError,
    MissingWeightsError,
    ModelMismatchError,
    NamespaceNotFoundError,
    NoDatabaseError,
    NotFoundError,
    TooLargeError,
    UsageError,
)
from .identity import ModelIdentity, ModelSpec
from .store import Hit, Item

__all__ = [
    "ClipsearchError",
    "Collection",
    "CollectionInfo",
    "DeviceUnavailableError",
    "DimensionError",
    "FetchError",
    "Hit",
    "ImageError",
    "Item",
    "ItemNotFoundError",
    "MissingWeightsError",
    "ModelChoice",
    "ModelIdentity",
    "ModelMismatchError",
    "ModelSpec",
    "NamespaceNotFoundError",
    "NoDatabaseError",
    "NotFoundError",
    "TooLargeError",
    "UsageError",
    "__version__",
    "describe",
    "open",
]
