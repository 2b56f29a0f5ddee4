"""FAISS indexes: derived data, built from a store's vectors and kept beside it.

Vectors are L2-normalised, so inner product is cosine similarity. Below ``hnsw_threshold``
vectors the index is exact (``IndexFlatIP``); above it, HNSW on inner product. Each index file
records the store generation it reflects, so a stale index is brought up to date on the next
search: new rows are appended, removed rows leave it (an exact index drops them; HNSW cannot,
so their ids become tombstones that every search excludes, until the index is compacted by a
rebuild), and only a missing, foreign or too-dead index is rebuilt from scratch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .settings import Settings

DEFAULT_HNSW_THRESHOLD = 50_000
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 128
DEFAULT_EF_SEARCH = 128
_PARALLEL_QUERIES = 16  # fewer queries than this are searched on the calling thread alone
_MAX_THREADS: list[int] = []  # FAISS's own thread count, read when FAISS is first loaded
# an HNSW index whose tombstones pass this share of its vectors is rebuilt: each dead vector still
# costs graph hops, and a filtered HNSW search returns fewer good neighbours the more it skips
MAX_DEAD_SHARE = 0.25
# Writing an index file costs its whole size (2.5 GB for 1M 512-d vectors in HNSW), catching an
# older file up costs only the rows that changed since. So a large index that was only caught up
# is written once the changes pass this share of it; a process that loads the older file catches
# up the same way. Small indexes are always written.
SAVE_CHANGED_SHARE = 0.01
SAVE_ALWAYS_BELOW = 50_000


def _faiss() -> Any:
    """FAISS, imported when an index is first built, read or searched: commands that only read
    the store (``info``, keyword search) never load it."""
    import faiss

    if not _MAX_THREADS:
        _MAX_THREADS.append(faiss.omp_get_max_threads())
    return faiss


# A filter that lets at most this many ids through is scored exactly on an HNSW index (about
# 20 ms for 100k x 512 on 2 cores): always right, and cheaper than a walk wide enough to be.
EXACT_FILTER_ROWS = 100_000
MAX_FILTER_EF = 4096  # the widest walk a less selective filter gets before the exact fallback
_EXACT_CHUNK = 8192  # ids scored at a time: 16 MiB of 512-d vectors


@dataclass
class IndexSettings:
    kind: str = "auto"  # auto | flat | hnsw
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD
    hnsw_m: int = DEFAULT_HNSW_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    ef_search: int = DEFAULT_EF_SEARCH
    exact_filter_rows: int = EXACT_FILTER_ROWS  # see _search_allowed

    @classmethod
    def of(cls, s: Settings) -> IndexSettings:
        """The index part of the settings (``CLIPSEARCH_INDEX``, ``CLIPSEARCH_HNSW_*``, ...)."""
        return cls(s.index, s.hnsw_threshold, s.hnsw_m, s.ef_construction, s.ef_search)

    def kind_for(self, count: int) -> str:
        if self.kind in ("flat", "hnsw"):
            return self.kind
        return "hnsw" if count >= self.hnsw_threshold else "flat"


@dataclass
class IndexState:
    """The store state an index file was built from."""

    kind: str
    dim: int
    count: int
    generation: int
    rebuild_generation: int
    max_seq: int
    owner: str = ""  # whose index it is: the store's id, the namespace and its creation (the store says)
    removal_mark: int = 0  # the store's removal log is applied up to this entry
    dead: list[int] = field(default_factory=list)  # tombstones: ids still in an HNSW graph, never returned

    @property
    def live(self) -> int:
        return self.count - len(self.dead)


class VectorIndex:
    """A FAISS index over (int64 sequence number -> vector)."""

    def __init__(self, index: Any, state: IndexState, settings: IndexSettings):
        self.index = index
        self.state = state
        self.settings = settings
        self.unsaved = 0  # rows added or removed since the file was written (or read)

    def worth_saving(self) -> bool:
        return self.state.live < SAVE_ALWAYS_BELOW or self.unsaved >= SAVE_CHANGED_SHARE * self.state.live

    @classmethod
    def empty(cls, kind: str, dim: int, settings: IndexSettings) -> VectorIndex:
        faiss = _faiss()
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = settings.ef_construction
        else:
            inner = faiss.IndexFlatIP(dim)
        state = IndexState(kind=kind, dim=dim, count=0, generation=0, rebuild_generation=0, max_seq=0)
        return cls(faiss.IndexIDMap2(inner), state, settings)

    def add(self, seqs: np.ndarray, vectors: np.ndarray) -> None:
        if len(seqs):
            # a search on this thread may have left FAISS at one thread (below): building an HNSW
            # graph with it took 75 s instead of 45 s at 100k vectors on 2 cores
            _faiss().omp_set_num_threads(_MAX_THREADS[0])
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), seqs.astype(np.int64))
            self.unsaved += len(seqs)
            self.state.count = int(self.index.ntotal)
            self.state.max_seq = max(self.state.max_seq, int(seqs.max()))

    def add_batches(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        for seqs, vectors in batches:
            self.add(seqs, vectors)

    def remove(self, seqs: np.ndarray) -> int:
        """Take these ids out of search results; ids the index does not hold are ignored. An
        exact index drops their vectors; an HNSW graph cannot lose nodes, so they become
        tombstones. Returns how many ids it held."""
        seqs = np.unique(np.asarray(seqs, dtype=np.int64))
        if not len(seqs) or not self.state.count:
            return 0
        faiss = _faiss()
        if self.state.kind != "hnsw":
            removed = int(self.index.remove_ids(faiss.IDSelectorBatch(seqs)))
            self.state.count = int(self.index.ntotal)
            self.unsaved += removed
            return removed
        held = faiss.vector_to_array(self.index.id_map)
        new = np.setdiff1d(seqs[np.isin(seqs, held)], np.asarray(self.state.dead, dtype=np.int64))
        self.state.dead = sorted({*self.state.dead, *new.tolist()})
        self.unsaved += len(new)
        return len(new)

    @property
    def dead_share(self) -> float:
        return len(self.state.dead) / self.state.count if self.state.count else 0.0

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and sequence numbers, shape (n, k); missing neighbours have seq -1. With
        ``allowed`` (the ids a filter lets through) every row holds min(k, len(allowed)) hits."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed is not None and self.state.kind == "hnsw" and self.state.live:
            return self._search_allowed(queries, k, np.asarray(allowed, dtype=np.int64))
        return self._search(queries, k, allowed)

    def _search_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A filtered search on the HNSW graph. A walk that may only stop at allowed nodes runs out
        before it finds them when they are few (recall@10 was 0.43 at 1% of 100k), so: up to
        ``exact_filter_rows`` allowed ids are scored exactly from the vectors the index holds;
        above, the walk's ``efSearch`` grows with the selectivity, and a query that still comes
        back short is scored exactly."""
        want = min(k, len(allowed))
        if len(allowed) <= self.settings.exact_filter_rows:
            return self.exact(queries, want, allowed)
        widen = -(-self.state.live // len(allowed))  # 1 / selectivity, rounded up
        ef = min(MAX_FILTER_EF, max(self.settings.ef_search, want) * widen)
        scores, seqs = self._search(queries, want, allowed, ef=ef)
        short = np.flatnonzero((seqs >= 0).sum(axis=1) < want)
        if len(short):
            scores[short], seqs[short] = self.exact(queries[short], want, allowed)
        return scores, seqs

    def exact(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of ``ids`` for each query by exact inner product, from the vectors the
        index holds, a bounded chunk at a time."""
        n = len(queries)
        best_scores = np.full((n, k), -np.inf, dtype=np.float32)
        best_seqs = np.full((n, k), -1, dtype=np.int64)
        for start in range(0, len(ids), _EXACT_CHUNK):
            chunk = np.ascontiguousarray(ids[start : start + _EXACT_CHUNK])
            scores = queries @ self.index.reconstruct_batch(chunk).T
            scores = np.concatenate([best_scores, scores], axis=1)
            seqs = np.concatenate([best_seqs, np.broadcast_to(chunk, (n, len(chunk)))], axis=1)
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # k kept + a non-empty chunk: more than k
            best_scores = np.take_along_axis(scores, top, axis=1)
            best_seqs = np.take_along_axis(seqs, top, axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")
        return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_seqs, order, axis=1)

    def _search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        k = max(1, min(k, self.state.live)) if self.state.live else 1
        params = None
        if self.state.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(ef or self.settings.ef_search, k)
        # the selectors must outlive the search: the parameters hold them by pointer only
        selector = dead = None
        if allowed is not None:
            # allowed ids come from the table, so they never name a removed row
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        elif self.state.dead:
            dead = faiss.IDSelectorBatch(np.asarray(self.state.dead, dtype=np.int64))
            selector = faiss.IDSelectorNot(dead)
        if selector is not None:
            if params is None:
                params = faiss.SearchParameters()
            params.sel = selector
        if self.state.live <= 0:
            n = len(queries)
            return np.zeros((n, 0), dtype=np.float32), np.zeros((n, 0), dtype=np.int64)
        # FAISS parallelises over queries. For a few queries extra OpenMP threads only cost: they
        # spin after the search and steal the cores the next text embedding needs (a single
        # query went from 10 ms to 19 ms end to end on 2 cores). The setting is per thread.
        faiss.omp_set_num_threads(1 if len(queries) < _PARALLEL_QUERIES else _MAX_THREADS[0])
        scores, seqs = self.index.search(queries, k, params=params)
        return scores, seqs

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        _faiss().write_index(self.index, str(tmp))
        os.replace(tmp, path)  # readers never see a half-written index
        meta = path.with_suffix(".json")
        meta_tmp = meta.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps(asdict(self.state)))
        os.replace(meta_tmp, meta)
        self.unsaved = 0

    @staticmethod
    def read_state(path: Path) -> IndexState | None:
        """What the index file at ``path`` was built from, without loading it (None: no index)."""
        meta = path.with_suffix(".json")
        try:
            state = IndexState(**json.loads(meta.read_text()))
            size = path.stat().st_size
        except (OSError, ValueError, TypeError):
            return None
        # an index file too small to hold its vectors is broken, and will be rebuilt on use
        return state if size >= state.count * state.dim * 4 else None

    @classmethod
    def load(cls, path: Path, settings: IndexSettings) -> VectorIndex | None:
        meta = path.with_suffix(".json")
        if not path.is_file() or not meta.is_file():
            return None
        try:
            state = IndexState(**json.loads(meta.read_text()))
            index = _faiss().read_index(str(path))
        except (OSError, ValueError, TypeError, RuntimeError):
            return None  # unreadable derived data is simply rebuilt
        if int(index.ntotal) != state.count:
            return None
        return cls(index, state, settings)
