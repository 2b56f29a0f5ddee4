"""Stores: where vectors, metadata and failures live. ``open_store(url)`` picks the backend."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError, option
from ..index import IndexSettings
from ..settings import DEFAULT_DB, Settings, is_postgres_url, is_server
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
    check_same_model,
    claim_owner,
    validate_namespace,
)
from .sqlite import SQLiteStore


def open_store(
    location: str | Path, index_settings: IndexSettings | None = None, *, settings: Settings | None = None
) -> Store:
    """Open the store at ``location``: a ``postgresql://`` URL (PostgreSQL with pgvector), or a
    SQLite file path (created if absent). Either is created or migrated to this version.
    ``settings``: the index and pool settings (default: the environment's, read now, once);
    ``index_settings`` overrides their index part."""
    loc = str(location)
    settings = settings or Settings.from_env()
    index_settings = index_settings or IndexSettings.of(settings)
    if is_postgres_url(loc):
        from .postgres import PostgresStore

        return PostgresStore(loc, index_settings, pool_size=settings.pg_pool)
    if "://" in loc:
        raise UsageError(f"{option('db')} {loc!r}: use a SQLite file path or a postgresql://user:pass@host/db URL")
    return SQLiteStore(loc, index_settings)


def database_exists(location: str | Path) -> bool:
    """Whether there is a database to read: a server is taken to exist, a SQLite file must."""
    return is_server(str(location)) or Path(location).exists()


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
    "claim_owner",
    "database_exists",
    "is_postgres_url",
    "is_server",
    "open_store",
    "validate_namespace",
]
