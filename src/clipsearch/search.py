"""Search over a store: by text (vector, keyword or hybrid), by image, by raw vector; similar
items; duplicate groups (a search of every vector for its near neighbours).

Everything here goes through the Store interface, so it works the same on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .errors import DimensionError, ItemNotFoundError, UsageError, option
from .store import Hit, Item, Store

if TYPE_CHECKING:
    from .encoders import Encoder

DUPLICATE_NEIGHBOURS = 32
SEARCH_MODES = ("vector", "keyword", "hybrid")
RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009): 1 / (60 + rank)
HYBRID_DEPTH = 100  # how deep each ranking is read before fusing


def weighted_term(term: str) -> tuple[float, str]:
    """``"2:sunset"`` → (2.0, "sunset"); a term without a numeric prefix has weight 1."""
    head, sep, rest = term.partition(":")
    if sep and rest.strip():
        try:
            return float(head), rest.strip()
        except ValueError:
            pass
    return 1.0, term.strip()


def query_terms(add: Sequence[str] = (), subtract: Sequence[str] = (), mode: str = "vector") -> list[tuple[float, str]]:
    """The texts to add to (positive weight) or subtract from (negative) a query vector; query
    arithmetic works on vectors, so only in ``mode`` vector."""
    terms = [weighted_term(t) for t in add] + [(-w, t) for w, t in (weighted_term(t) for t in subtract)]
    if terms and mode != "vector":
        raise UsageError(f"adding or subtracting texts works in vector mode, not {mode}", param="add")
    for weight, text in terms:
        if not text:
            raise UsageError(f"an {option('add')} or {option('subtract')} term is empty", param="add")
        if weight == 0:
            raise UsageError(f"the weight of {text!r} is 0; leave the term out instead", param="add")
    return terms


def combine(query: np.ndarray, terms: list[tuple[float, str]], vectors: np.ndarray) -> np.ndarray:
    """Query arithmetic (as rclip does it): the query plus each term's vector times its weight,
    L2-normalised again, e.g. "beach" + "sunset" - "people"."""
    out = np.asarray(query, np.float32).copy()
    for (weight, _), vector in zip(terms, vectors, strict=True):
        out += np.float32(weight) * vector
    norm = float(np.linalg.norm(out))
    if norm < 1e-6:
        raise UsageError("the terms cancel the query out; change a weight", param="subtract")
    return out / norm


def search_vector(
    store: Store,
    namespace: str,
    vector: np.ndarray,
    limit: int = 10,
    filters: dict[str, Any] | None = None,
    field: str = "image",
) -> list[Hit]:
    vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
    if not np.all(np.isfinite(vector)):
        raise DimensionError("the query vector contains NaN or infinite values")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise DimensionError("the query vector is all zeros")
    return store.search(namespace, vector / norm, limit, filters, field=field)[0]


def similar_items(
    store: Store,
    namespace: str,
    item_id: str,
    limit: int = 10,
    same: list[str] | None = None,
    filters: dict[str, Any] | None = None,
) -> list[Hit]:
    """The nearest items to an item by image vector, without the item itself. ``same``: only
    items that share the item's value of each of these metadata keys (e.g. its client);
    ``filters``: only those passing them."""
    vectors = store.get_vectors(namespace, [item_id])
    if item_id not in vectors:
        raise ItemNotFoundError(item_id, namespace)
    filters = dict(filters) if filters else None
    if same:
        metadata = store.get_items(namespace, [item_id])[0].metadata
        missing = [key for key in same if metadata.get(key) in (None, "")]
        if missing:
            raise UsageError(f"item {item_id!r} has no {', '.join(missing)} to match", param="same_filter")
        filters = {**(filters or {}), **{key: metadata[key] for key in same}}
    hits = search_vector(store, namespace, vectors[item_id], limit + 1, filters)
    return [h for h in hits if h.item.id != item_id][:limit]


def search_text(
    store: Store,
    encoder: Encoder | None,
    namespace: str,
    text: str,
    limit: int = 10,
    filters: dict[str, Any] | None = None,
    mode: str = "vector",
    vector: np.ndarray | None = None,
) -> list[Hit]:
    """Text search. ``vector``: the image vectors, by the query's text embedding. ``keyword``:
    the words of item text and metadata (BM25), no model needed. ``hybrid``: reciprocal rank
    fusion of the keyword ranking, the image-vector ranking and, where items have text vectors
    (``--embed-text``), the text-vector ranking; its scores are fused ranks, not cosines.
    ``vector`` may carry the query's embedding when the caller already has it."""
    if mode not in SEARCH_MODES:
        raise UsageError(f"unknown search mode {mode!r}; use {', '.join(SEARCH_MODES)}")
    if mode == "keyword":
        return store.keyword_search(namespace, text, limit, filters)
    if vector is None:
        if encoder is None:
            raise UsageError(f"{mode} search needs the model to embed the query")
        vector = encoder.embed_texts([text])[0]
    if mode == "vector":
        return search_vector(store, namespace, vector, limit, filters)
    depth = max(HYBRID_DEPTH, limit)
    rankings = [search_vector(store, namespace, vector, depth, filters)]
    if store.has_text_vectors(namespace):
        rankings.append(search_vector(store, namespace, vector, depth, filters, field="text"))
    if any(c.isalnum() for c in text):
        rankings.append(store.keyword_search(namespace, text, depth, filters))
    return fuse_rankings(rankings, limit)


def fuse_rankings(rankings: list[list[Hit]], limit: int, k: int = RRF_K) -> list[Hit]:
    """Reciprocal rank fusion: an item scores the sum of 1 / (k + rank) over the rankings it
    is in. Scales do not matter (cosines and BM25 are not comparable), only positions."""
    scores: dict[str, float] = {}
    items: dict[str, Item] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, 1):
            scores[hit.item.id] = scores.get(hit.item.id, 0.0) + 1.0 / (k + rank)
            items.setdefault(hit.item.id, hit.item)
    best = sorted(scores, key=lambda i: (-scores[i], i))[:limit]
    return [Hit(items[i], scores[i]) for i in best]


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
