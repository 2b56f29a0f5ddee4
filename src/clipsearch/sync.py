"""Keeping a namespace in step with its folders (``ingest --prune``): what is gone leaves, what
moved keeps its vector.

Given the folders an ingest lists and what they hold now, ``prune`` finds the stored items whose
file lay under one of those folders and no longer exists. A new file under the folders whose
content hash equals a gone item's is that item renamed or moved: its vector and metadata move
to the new id and path, no re-embedding. Every other gone item is deleted (vector, metadata,
keyword entry, text vector) and so are the recorded failures of gone files; the index is then
brought up to date. Only folders are pruned: an item's row does not say which image list or
which run put it there, so nothing else can tell "gone" from "not listed this time".
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .files import sha256_file
from .sources import FolderSource, SourceItem
from .store import NewItem, Store
from .store.base import PHOTO_KEYS, with_derived


@dataclass
class PruneReport:
    removed: int = 0  # items whose file is gone, deleted
    moved: int = 0  # items whose file was renamed or moved, kept with their vector
    failures_cleared: int = 0  # recorded failures of files that are gone


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def prune(store: Store, namespace: str, folders: Iterable[FolderSource], listed: list[SourceItem]) -> PruneReport:
    """Remove what is gone from ``folders`` (whose current listing is ``listed``), keeping the
    vectors of moved files; see the module docstring."""
    report = PruneReport()
    roots = [os.path.abspath(f.root) for f in folders]
    if not roots or store.identity(namespace) is None:
        return report
    listed_ids = {item.id for item in listed}
    gone: dict[str, tuple] = {}  # id -> (item, vector)
    for items, vectors in store.iter_vectors(namespace):
        for item, vector in zip(items, vectors, strict=True):
            path = item.metadata.get("path")
            if (
                item.id not in listed_ids
                and isinstance(path, str)
                and _under(path, roots)
                and not os.path.lexists(path)
            ):
                gone[item.id] = (item, vector)
    if gone:
        by_hash = {}
        for item, vector in gone.values():
            if item.sha256:
                by_hash.setdefault(item.sha256, []).append((item, vector))
        new = [it for it in listed if it.error is None and it.path is not None]
        stored = store.file_states(namespace, [it.id for it in new]) if by_hash else {}
        for source_item in new:
            if not by_hash or source_item.id in stored:
                continue
            digest = _sha256(source_item.path)  # type: ignore[arg-type]
            matches = by_hash.get(digest or "")
            if not matches:
                continue
            old, vector = matches.pop()
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
            row = NewItem(source_item.id, meta, digest, source_item.size, source_item.mtime_ns, source_item.fingerprint)
            store.write_batch(namespace, [row], vector[None, :])
            store.delete_items(namespace, [old.id])
            del gone[old.id]
            report.moved += 1
        if gone:
            report.removed = store.delete_items(namespace, list(gone))
    stale = [
        f.id
        for f in store.failures(namespace)
        if f.id not in listed_ids and _under(f.source, roots) and not os.path.lexists(f.source)
    ]
    if stale:
        store.clear_failures(namespace, stale)
        report.failures_cleared = len(stale)
    if report.removed or report.moved:
        store.build_index(namespace)
    return report
