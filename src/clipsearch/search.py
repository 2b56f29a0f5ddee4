"""Search over a store: by text, by image, by raw vector; duplicate groups; export.

Everything here goes through the Store interface, so it works the same on every backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .encoders import Encoder
from .errors import DimensionError
from .store import Hit, Item, Store

DUPLICATE_NEIGHBOURS = 32


def search_vector(
    store: Store, namespace: str, vector: np.ndarray, limit: int = 10, filters: dict[str, Any] | None = None
) -> list[Hit]:
    vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
    if not np.all(np.isfinite(vector)):
        raise DimensionError("the query vector contains NaN or infinite values")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise DimensionError("the query vector is all zeros")
    return store.search(namespace, vector / norm, limit, filters)[0]


def search_text(
    store: Store,
    encoder: Encoder,
    namespace: str,
    text: str,
    limit: int = 10,
    filters: dict[str, Any] | None = None,
) -> list[Hit]:
    return search_vector(store, namespace, encoder.embed_texts([text])[0], limit, filters)


def search_image(
    store: Store,
    encoder: Encoder,
    namespace: str,
    image: Image.Image,
    limit: int = 10,
    filters: dict[str, Any] | None = None,
) -> list[Hit]:
    return search_vector(store, namespace, encoder.embed_images([image])[0], limit, filters)


@dataclass
class DuplicateGroup:
    kind: str  # exact: identical bytes; near: vectors above the threshold
    score: float  # the weakest similarity that joined the group
    items: list[Item]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "score": round(self.score, 6),
            "items": [{"id": it.id, "path": it.metadata.get("path"), "sha256": it.sha256} for it in self.items],
        }


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def find_duplicates(store: Store, namespace: str, threshold: float = 0.95) -> list[DuplicateGroup]:
    """Groups of near-identical items: identical content hashes first, then vector neighbours
    whose cosine similarity is at least ``threshold``, joined transitively."""
    uf = _UnionFind()
    weakest: dict[tuple[str, str], float] = {}
    items_by_id: dict[str, Item] = {}
    for group in store.hash_groups(namespace):
        for it in group:
            items_by_id[it.id] = it
        for it in group[1:]:
            uf.union(group[0].id, it.id)
            weakest[(group[0].id, it.id)] = 1.0

    for items, vectors in store.iter_vectors(namespace, batch_size=2048):
        results = store.search(namespace, vectors, DUPLICATE_NEIGHBOURS)
        for item, hits in zip(items, results, strict=True):
            items_by_id.setdefault(item.id, item)
            for hit in hits:
                if hit.score < threshold:
                    break  # hits are sorted by score
                if hit.item.id == item.id:
                    continue
                items_by_id.setdefault(hit.item.id, hit.item)
                uf.union(item.id, hit.item.id)
                key = (min(item.id, hit.item.id), max(item.id, hit.item.id))
                weakest[key] = min(weakest.get(key, 1.0), hit.score)

    members: dict[str, list[str]] = {}
    for item_id in uf.parent:
        members.setdefault(uf.find(item_id), []).append(item_id)
    edge_score: dict[str, float] = {}
    for (a, _b), score in weakest.items():
        root = uf.find(a)
        edge_score[root] = min(edge_score.get(root, 1.0), score)

    groups = []
    for root, ids in members.items():
        if len(ids) < 2:
            continue
        items = sorted((items_by_id[i] for i in ids), key=lambda it: str(it.metadata.get("path", it.id)))
        exact = len({it.sha256 for it in items}) == 1 and items[0].sha256 is not None
        groups.append(DuplicateGroup("exact" if exact else "near", edge_score.get(root, 1.0), items))
    groups.sort(key=lambda g: (g.kind != "exact", -len(g.items), -g.score))
    return groups


def export_vectors(store: Store, namespace: str, npy_path: Path, meta_path: Path) -> int:
    """Write all vectors as a float32 (N, D) .npy and the ids + metadata, in the same order, as JSON."""
    ids_meta: list[dict[str, Any]] = []
    chunks: list[np.ndarray] = []
    for items, vectors in store.iter_vectors(namespace):
        chunks.append(vectors)
        ids_meta.extend({"id": it.id, "metadata": it.metadata} for it in items)
    info = store.namespace(namespace)
    dim = info.identity.dim if info else 0
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)
    np.save(npy_path, matrix.astype(np.float32, copy=False))
    meta_path.write_text(
        json.dumps(
            {
                "namespace": namespace,
                "model": info.identity.as_dict() if info else None,
                "count": len(ids_meta),
                "items": ids_meta,
            },
            ensure_ascii=False,
            indent=1,
        )
    )
    return len(ids_meta)
