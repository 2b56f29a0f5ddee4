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

from .errors import NamespaceNotFoundError
from .store import Store


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
    with open(npy_path, "wb") as f:  # the name given, not one with ".npy" appended
        np.save(f, matrix.astype(np.float32, copy=False))
    meta_path.write_text(
        json.dumps(
            {
                "namespace": namespace,
                "model": info.identity.as_dict() if info else None,
                "model_spec": info.model_spec if info else None,  # how to load it (import records it)
                "count": len(ids_meta),
                "items": ids_meta,
            },
            ensure_ascii=False,
            indent=1,
        )
    )
    return len(ids_meta)


def export_seed_compatible(store: Store, namespace: str, out_dir: Path, hnsw_m: int = 32) -> int:
    """The layout catalog scripts load: ``embeddings.npy`` (float32, N x D), ``metadata.json``
    (one object per row, in the same order, each with its ``id``), ``index.faiss`` (HNSW, inner
    product; FAISS ids are row numbers) with ``index_ids.json`` (row number -> id), and
    ``manifest.json`` (model, dimensions, count, metric)."""
    import faiss

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
