"""clipsearch: self-hosted CLIP embeddings and semantic image search.

The library is ``clipsearch.open(db, namespace, ...) -> Collection``; the command line, the HTTP
server, the table worker and Ray ingest are callers of it. Data flows one way: sources ->
decode_stage -> encoders -> store / index -> collection -> CLI / server / table worker / Ray.

    import clipsearch

    with clipsearch.open("photos.db") as photos:
        photos.ingest(["~/Pictures"])
        hits = photos.search("a dog on a beach", limit=5)
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

# What ``import clipsearch`` offers, imported on first use (PEP 562): the command line imports
# this package, and ``clipsearch --help`` should not pay for numpy, the store and the index.
_EXPORTS = {
    "Collection": "collection",
    "CollectionInfo": "collection",
    "Page": "collection",
    "describe": "collection",
    "open": "collection",
    "ModelChoice": "choice",
    "CatalogOptions": "catalog",
    "RayOptions": "distributed",
    "IngestOptions": "pipeline",
    "IngestReport": "pipeline",
    "ModelIdentity": "identity",
    "ModelSpec": "identity",
    "Hit": "store",
    "Item": "store",
    **{
        name: "errors"
        for name in (
            "ClipsearchError",
            "DeviceUnavailableError",
            "DimensionError",
            "FetchError",
            "ImageError",
            "ItemNotFoundError",
            "MissingWeightsError",
            "ModelMismatchError",
            "NamespaceNotFoundError",
            "NoDatabaseError",
            "NotFoundError",
            "StorageError",
            "TooLargeError",
            "UsageError",
        )
    },
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipsearch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .catalog import CatalogOptions
    from .choice import ModelChoice
    from .collection import Collection, CollectionInfo, Page, describe, open
    from .distributed import RayOptions
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
        StorageError,
        TooLargeError,
        UsageError,
    )
    from .identity import ModelIdentity, ModelSpec
    from .pipeline import IngestOptions, IngestReport
    from .store import Hit, Item

__all__ = [
    "CatalogOptions",
    "ClipsearchError",
    "Collection",
    "CollectionInfo",
    "DeviceUnavailableError",
    "DimensionError",
    "FetchError",
    "Hit",
    "ImageError",
    "IngestOptions",
    "IngestReport",
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
    "Page",
    "RayOptions",
    "StorageError",
    "TooLargeError",
    "UsageError",
    "__version__",
    "describe",
    "open",
]
