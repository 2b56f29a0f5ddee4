"""Keeping a namespace in step with its sources (``ingest --prune``, ``watch``): what is gone
leaves, what moved keeps its vector.

A source owns the stored items it put there: a folder the items whose file lies under it, an
image list and a catalog the items whose metadata names it (``image_list``, ``catalog_path``;
rows from before those keys by the catalog's file name). Given the sources an ingest lists and
what they hold now, ``prune`` removes the items they own that are gone:

- a folder's item whose file no longer exists (and is not listed);
- an image list's or a catalog's item whose row is no longer in the file, or whose row names a
  local file that no longer exists.

A listed file that is not stored yet and whose content hash equals a gone item's is that item
renamed or moved: its vector and metadata move to the new id and path, no re-embedding. Every
other gone item is deleted (vector, metadata, keyword entry, text vector, index entry) and so
are the recorded failures of rows and files that are gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import CatalogSource
from .files import sha256_file
from .sources import FolderSource, ImageListSource, Source, SourceItem
from .store import Item, NewItem, Store
from .store.base import PHOTO_KEYS, with_derived

PRUNABLE = (FolderSource, ImageListSource, CatalogSource)


@dataclass
class PruneReport:
    removed: int = 0  # items whose file or row is gone, deleted
    moved: int = 0  # items whose file was renamed or moved, kept with their vector
    failures_cleared: int = 0  # recorded failures of files and rows that are gone


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


class _Owners:
    """Which stored items (and failures) the named sources own, and which of those are gone."""

    def __init__(self, sources: Iterable[Source]):
        self.roots = [os.path.abspath(s.root) for s in sources if isinstance(s, FolderSource)]
        self.lists = {str(s.list_file.resolve()) for s in sources if isinstance(s, ImageListSource)}
        catalogs = [s for s in sources if isinstance(s, CatalogSource)]
        self.catalogs = {str(s.path.resolve()) for s in catalogs}
        self.catalog_names = {s.path.name for s in catalogs}

    def __bool__(self) -> bool:
        return bool(self.roots or self.lists or self.catalogs)

    def by_row(self, metadata: dict[str, Any]) -> bool:
        """Owned by an image list or a catalog named: its row says so."""
        if metadata.get("image_list") in self.lists:
            return True
        if "catalog_path" in metadata:
            return metadata["catalog_path"] in self.catalogs
        return metadata.get("catalog") in self.catalog_names

    def gone(self, item_id: str, metadata: dict[str, Any], listed: dict[str, SourceItem]) -> bool:
        path = metadata.get("path")
        if self.by_row(metadata):
            row = listed.get(item_id)
            if row is None:
                return True  # the row left the file
            return row.path is not None and not os.path.lexists(row.path)
        return (
            item_id not in listed and isinstance(path, str) and _under(path, self.roots) and not os.path.lexists(path)
        )


def prune(store: Store, namespace: str, sources: Iterable[Source], listed: list[SourceItem]) -> PruneReport:
    """Remove what the ``sources`` (whose current listing is ``listed``) own and is gone,
    keeping the vectors of moved files; see the module docstring."""
    report = PruneReport()
    owners = _Owners(sources)
    if not owners or store.identity(namespace) is None:
        return report
    by_id = {item.id: item for item in listed}
    # metadata alone decides what is gone; only a gone item's vector may be needed (if it moved)
    gone: dict[str, Item] = {
        item.id: item
        for items in store.iter_items(namespace)
        for item in items
        if owners.gone(item.id, item.metadata, by_id)
    }
    if gone:
        report.moved = _keep_moved(store, namespace, gone, listed)
        if gone:
            report.removed = store.delete_items(namespace, list(gone))
    stale = [f.id for f in store.failures(namespace) if f.id not in by_id and owners.gone(f.id, f.metadata, by_id)]
    if stale:
        store.clear_failures(namespace, stale)
        report.failures_cleared = len(stale)
    return report


def _keep_moved(store: Store, namespace: str, gone: dict[str, Item], listed: list[SourceItem]) -> int:
    """Give each new listed file whose content a gone item had that item's vector, under the
    new id; those items leave ``gone``. Returns how many moved."""
    by_hash: dict[str, list[Item]] = {}
    for item in gone.values():
        if item.sha256:
            by_hash.setdefault(item.sha256, []).append(item)
    if not by_hash:
        return 0
    new = [it for it in listed if it.error is None and it.path is not None and it.id not in gone]
    stored = store.file_states(namespace, [it.id for it in new])
    moved = 0
    for source_item in new:
        if not by_hash or source_item.id in stored:
            continue
        digest = _sha256(source_item.path)  # type: ignore[arg-type]
        matches = by_hash.get(digest or "")
        if not matches:
            continue
        old = matches.pop()
        if not matches:
            del by_hash[digest]  # type: ignore[arg-type]
        meta = with_derived(
            source_item.metadata,
            namespace=namespace,
            width=int(old.metadata.get("width") or 0),
            height=int(old.metadata.get("height") or 0),
            sha256=digest or "",
            size=source_item.size or 0,
            photo={k: old.metadata.get(k) for k in PHOTO_KEYS},
        )
        row = NewItem(
            source_item.id,
            meta,
            digest,
            source_item.size,
            source_item.mtime_ns,
            source_item.fingerprint,
            source_item.text,
        )
        vector = store.get_vectors(namespace, [old.id])[old.id]
        store.write_batch(namespace, [row], vector[None, :])
        store.delete_items(namespace, [old.id])
        del gone[old.id]
        moved += 1
    return moved
