"""Import: vectors made elsewhere, with their ids and metadata, read from the files ``export``
writes (a ``.npy`` matrix + JSON of ids and metadata, or the seed-compatible folder) or a catalog
script's ``.npy`` + JSON / JSON Lines metadata. The matrix is memory-mapped and the rows are read
a chunk at a time, so a file larger than memory streams in (JSON Lines metadata streams too).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .identity import ModelIdentity

CHUNK = 10_000  # rows written per transaction


@dataclass
class ImportFiles:
    """What one import reads: the vectors, where their ids and metadata are, and the model that
    made them when the files say (``export`` records it; a catalog script's files may not)."""

    vectors: np.ndarray  # (N, D), memory-mapped
    meta: Path
    model: ModelIdentity | None
    count: int
    records: list[Any] | None = None  # JSON's records, read once; JSON Lines are read as they go
    model_spec: dict[str, Any] | None = None  # how to load the model, where export recorded it

    def rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(id, metadata) of each row, in the matrix's order."""
        records = self.records if self.records is not None else _json_lines(self.meta)
        for n, row in enumerate(records):
            yield _row(row, n, self.meta)

    def id_chunks(self, size: int = CHUNK) -> Iterator[tuple[list[str], list[dict[str, Any]]]]:
        """The ids and metadata, ``size`` rows at a time (no vector is read)."""
        ids: list[str] = []
        metas: list[dict[str, Any]] = []
        for item_id, metadata in self.rows():
            ids.append(item_id)
            metas.append(metadata)
            if len(ids) == size:
                yield ids, metas
                ids, metas = [], []
        if ids:
            yield ids, metas

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any]]]]:
        """The ids, vectors and metadata, ``size`` rows at a time."""
        start = 0
        for ids, metas in self.id_chunks(size):
            yield ids, np.asarray(self.vectors[start : start + len(ids)], dtype=np.float32), metas
            start += len(ids)


def open_import(npy: Path, meta: Path | None = None) -> ImportFiles:
    """The files of an import: ``npy`` a ``.npy`` file with ``meta`` its JSON or JSON Lines
    (default: ``npy`` with ``.json``), or a seed-compatible folder (``embeddings.npy``,
    ``metadata.json``, ``manifest.json``). Checked before anything is written: the matrix is
    two-dimensional floats and has one row per metadata record, each with an id."""
    npy = npy.expanduser()
    model: dict[str, Any] | None = None
    spec: dict[str, Any] | None = None
    if npy.is_dir():
        folder = npy
        npy, meta = folder / "embeddings.npy", meta or folder / "metadata.json"
        manifest = folder / "manifest.json"
        if manifest.is_file():
            head = _load_json(manifest, "npy")
            model, spec = head.get("model"), head.get("model_spec")
    meta = (meta or npy.with_suffix(".json")).expanduser()
    for path, param in ((npy, "npy"), (meta, "meta")):
        if not path.is_file():
            raise UsageError(f"{path} does not exist", param=param)
    try:
        vectors = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UsageError(f"{npy} is not a .npy matrix ({e})", param="npy") from None
    if vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise UsageError(
            f"{npy} holds a {vectors.dtype} array of shape {vectors.shape}; import takes float vectors, one row each",
            param="npy",
        )
    records = None
    if meta.suffix != ".jsonl":
        data = _load_json(meta, "meta")
        if isinstance(data, dict):
            model, spec = data.get("model") or model, data.get("model_spec") or spec
        records = _as_records(data, meta)
    files = ImportFiles(vectors, meta, None, 0, records)
    count = sum(1 for _ in files.rows())  # every record has an id: checked before anything is written
    if count != len(vectors):
        raise UsageError(
            f"{npy} has {len(vectors)} vectors but {meta} has {count} records; they must match row for row",
            param="meta",
        )
    identity = ModelIdentity.from_dict(model) if isinstance(model, dict) else None
    if identity is not None and identity.dim != vectors.shape[1]:
        raise UsageError(
            f"{npy} holds {vectors.shape[1]}-d vectors but names {identity.model}, whose vectors have {identity.dim}",
            param="npy",
        )
    for start in range(0, len(vectors), CHUNK * 10):
        chunk = np.asarray(vectors[start : start + CHUNK * 10], dtype=np.float32)
        norms = np.linalg.norm(chunk, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
        if len(bad):
            raise UsageError(f"{npy}, row {start + int(bad[0])}: a vector of zeros, NaN or infinity", param="npy")
    files.model, files.count = identity, count
    files.model_spec = spec if identity is not None and isinstance(spec, dict) else None
    return files


def _load_json(path: Path, param: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UsageError(f"{path} is not JSON ({e})", param=param) from None


def _json_lines(meta: Path) -> Iterator[Any]:
    """The records of a JSON Lines file, one by one as it is read."""
    with meta.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{meta}, line {n}: not JSON ({e})", param="meta") from None


def _as_records(data: Any, meta: Path) -> list[Any]:
    """JSON's records: a list of them, or an object with ``items`` (what ``export`` writes)."""
    records = data.get("items") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise UsageError(f"{meta} holds neither a list of records nor an object with 'items'", param="meta")
    return records


def _row(record: Any, n: int, meta: Path) -> tuple[str, dict[str, Any]]:
    """A record as (id, metadata): ``{"id", "metadata"}`` (``export``), or any object with an
    ``id``, whose other fields are the metadata (a catalog script's)."""
    if not isinstance(record, dict) or record.get("id") in (None, ""):
        raise UsageError(f"{meta}, record {n}: no id", param="meta")
    item_id = str(record["id"])
    if set(record) <= {"id", "metadata"} and isinstance(record.get("metadata", {}), dict):
        return item_id, dict(record.get("metadata") or {})
    return item_id, {k: v for k, v in record.items() if k != "id"}
