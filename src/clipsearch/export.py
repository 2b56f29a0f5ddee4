"""Export: a namespace's vectors and metadata as files other tools load (``clipsearch export``,
``Collection.export``): a ``.npy`` matrix with its ids and metadata as JSON, or the layout that
catalog scripts read (embeddings, metadata, a FAISS HNSW index, a manifest). Through the Store
interface, so every backend exports alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MissingExtraError, NamespaceNotFoundError
from .store import Store


def export_vectors(store: Store, namespace: str, npy_path: Path, meta_path: Path) -> int:
    """Write all vectors as a float32 (N, D) .npy and the ids + metadata, in the same order, as
    JSON; a chunk at a time, so an export larger than memory streams out. N is the count when
    the export starts: rows stored meanwhile are left out, and rows deleted meanwhile shorten it."""
    info = store.namespace(namespace)
    if info is None:
        raise NamespaceNotFoundError(namespace, store.location)
    dim, total = info.identity.dim, info.items
    done = 0
    # the name given, not one with ".npy" appended
    matrix = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float32, shape=(total, dim))
    with open(meta_path, "w", encoding="utf-8") as meta:
        head = {"namespace": namespace, "model": info.identity.as_dict(), "model_spec": info.model_spec}
        meta.write(json.dumps(head, ensure_ascii=False, indent=1)[:-2] + ',\n "items": [')
        for items, vectors in store.iter_vectors(namespace):
            take = min(len(items), total - done)
            matrix[done : done + take] = vectors[:take]
            for n, it in enumerate(items[:take]):
                comma = "," if done + n else ""
                meta.write(f"{comma}\n  " + json.dumps({"id": it.id, "metadata": it.metadata}, ensure_ascii=False))
            done += take
            if done == total:
                break
        meta.write(f'\n ],\n "count": {done}\n}}\n')
    matrix.flush()
    del matrix
    if done < total:  # rows were deleted meanwhile: the matrix holds only what was written
        kept = np.load(npy_path, mmap_mode="r")[:done].copy()
        with open(npy_path, "wb") as f:
            np.save(f, kept)
    return done


def export_seed_compatible(store: Store, namespace: str, out_dir: Path, hnsw_m: int = 32) -> int:
    """The layout catalog scripts load: ``embeddings.npy`` (float32, N x D), ``metadata.json``
    (one object per row, in the same order, each with its ``id``), ``index.faiss`` (HNSW, inner
    product; FAISS ids are row numbers) with ``index_ids.json`` (row number -> id), and
    ``manifest.json`` (model, dimensions, count, metric)."""
    try:
        import faiss
    except ImportError:
        raise MissingExtraError("the seed-compatible export (its index.faiss)", "faiss") from None

    info = store.namespace(namespace)
    if info is None:
        raise NamespaceNotFoundError(namespace, store.location)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    chunks: list[np.ndarray] = []
    index = faiss.IndexHNSWFlat(info.identity.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    for items, vectors in store.iter_vectors(namespace):
        chunks.append(vectors)
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        rows.extend({**it.metadata, "id": it.id} for it in items)
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, info.identity.dim), dtype=np.float32)
    ids = [r["id"] for r in rows]

    def write(name: str, text: str) -> None:
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)

    np.save(out_dir / "embeddings.npy", matrix.astype(np.float32, copy=False))
    write("metadata.json", json.dumps(rows, ensure_ascii=False, indent=1))
    faiss.write_index(index, str(out_dir / "index.faiss"))
    write("index_ids.json", json.dumps(ids, ensure_ascii=False))
    manifest = {
        "format": "seed-compatible",
        "namespace": namespace,
        "model": info.identity.as_dict(),
        "model_spec": info.model_spec,
        "dimensions": info.identity.dim,
        "count": len(ids),
        "metric": "inner_product (vectors are L2-normalised: cosine similarity)",
        "files": ["embeddings.npy", "metadata.json", "index.faiss", "index_ids.json"],
    }
    write("manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1))
    return len(ids)
