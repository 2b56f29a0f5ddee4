"""Stores: where vectors, metadata and failures live. ``open_store(url)`` picks the backend."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..index import IndexSettings
from .base import (
    DEFAULT_NAMESPACE,
    Failure,
    FailureRecord,
    FileState,
    Hit,
    IndexStatus,
    Item,
    NamespaceInfo,
    NewItem,
    Store,
)
from .sqlite import SQLiteStore, check_same_model, validate_namespace

DEFAULT_DB = "clipsearch.db"


def open_store(location: str | Path, index_settings: IndexSettings | None = None) -> Store:
    """Open the store at ``location``: a SQLite file path (created if absent)."""
    loc = str(location)
    if loc.startswith(("postgresql://", "postgres://")):
        raise UsageError(
            "PostgreSQL stores are not available in this version of clipsearch; use a SQLite file path for --db"
        )
    return SQLiteStore(loc, index_settings)


__all__ = [
    "DEFAULT_DB",
    "DEFAULT_NAMESPACE",
    "Failure",
    "FailureRecord",
    "FileState",
    "Hit",
    "IndexStatus",
    "Item",
    "NamespaceInfo",
    "NewItem",
    "SQLiteStore",
    "Store",
    "check_same_model",
    "open_store",
    "validate_namespace",
]
