"""Vector indexes: derived data, built from a store's vectors and kept beside it.

Vectors are L2-normalised, so inner product is cosine similarity. The kind follows the vector
count and a memory budget (``CLIPSEARCH_INDEX_MEMORY``), in autofaiss's spirit: exact below
``hnsw_threshold`` vectors (NumPy: every vector scored by one matrix product, as FAISS's
``IndexFlatIP`` would, so the core install needs no FAISS); with FAISS (the ``faiss`` extra),
HNSW on inner product while its graph and fp32 vectors fit the budget, and above that IVF-PQ with
4-bit fast-scan codes in memory (128 bytes a 512-d vector), whose candidates are re-ranked
exactly from a file of fp16 vectors beside it, memory-mapped (the page cache holds it, not the
process). Without FAISS every collection is searched exactly, as long as it fits the budget.

Each index file records the store generation it reflects, so a stale index is brought up to
date on the next search: new rows are appended, removed rows leave it (exact and IVF indexes
drop them; HNSW cannot, so their ids become tombstones that every search excludes, until the
index is compacted by a rebuild; IVF-PQ's fp16 file keeps removed rows until it is rewritten
without them, when they pass half of it), and only a missing, foreign, outgrown or too-dead index
is rebuilt from scratch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import json
import logging
import math
import mmap
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import MemoryLockError, MissingExtraError, UsageError
from .settings import parse_size

if TYPE_CHECKING:
    from .settings import Settings

KINDS = ("flat", "hnsw", "ivfpq")
DEFAULT_HNSW_THRESHOLD = 50_000
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 128
DEFAULT_EF_SEARCH = 128  # PostgreSQL's, and HNSW's up to EF_BY_SIZE_BASE vectors (see hnsw_ef)
EF_BY_SIZE_BASE = 100_000
EF_BY_SIZE_POWER = 0.8
MAX_EF_BY_SIZE = 2048
# the share of this machine's memory an index may take when CLIPSEARCH_INDEX_MEMORY says nothing
DEFAULT_MEMORY_SHARE = 0.25
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
# An index file goes to disk this much at a time (fdatasync as it is written): a write then never
# leaves a gigabyte of dirty pages for the kernel to write back later, beside the reads of a
# delete or a cold search, and a write that is stopped (SaveCancelled) stops within one piece
# (~0.1 s at the 400 MB/s of this disk)
SAVE_PIECE = 32 << 20

# IVF-PQ: the coarse lists are k-means centroids and the codes a product quantiser, both trained
# on the vectors, so an IVF index needs some to learn from.
IVF_MIN_VECTORS = 256
MAX_NLIST = 16384
IVF_LIST_ROWS = 600
# Above this many lists, k-means and adding assign each vector to its list through an HNSW graph
# of the centroids (FAISS's IVF..._HNSW32 way) instead of comparing it with every centroid: at
# 16,384 lists a flat assignment of 10M vectors is ~17 minutes of arithmetic on 2 cores. Searches
# still rank the lists exactly (the centroids' flat index is what the file keeps).
HNSW_ASSIGN_LISTS = 4096
IVF_TRAIN_PER_LIST = 40  # k-means sample a list, up to HNSW_ASSIGN_LISTS lists ...
IVF_TRAIN_PER_LIST_HNSW = 20  # ... and above (k-means of 16,384 lists on 328k vectors, 10 rounds)
# new vectors are added to the trained lists until the index holds this many times what it was
# trained on; then it is retrained (a rebuild), as it is by `index build`
IVF_REGROW = 4
# At 10M (16,384 lists) 512 lists visited found 0.966 of text queries' true top 10 at a p50 of
# 16 ms, 384 found 0.960 at 11 ms and 320 0.954 at 10 ms (`benchmarks/scale.py`, residual codes)
MAX_NPROBE = 384
DEFAULT_RERANK = 256  # IVF-PQ candidates per query re-scored exactly from the fp16 vectors, at least
# ... and one in this many of the codes an unfiltered query scans (see rerank): 1,019 of the 234k
# a query scans at 10M. With 585 (one in 400) image queries found 0.961 of their true top 10 on
# one build and 0.945 on another (k-means through the multi-threaded HNSW assigner differs from
# build to build); 1,024 found 0.964 on the second, at a p50 of 5.7-6.8 ms against 5.4 ms
RERANK_SHARE = 230
# the fp16 file keeps removed rows: it is rewritten without them (VectorIndex.compact_file, as the
# index file is next written) once they pass this share of it. Not rebuilt: the lists and codes
# stay as trained, and the rewrite is one read of the file (at 10M rows, 4.9M live: a rebuild from
# the table had taken 466 s, in the answer path)
MAX_FILE_WASTE = 0.5
READ_AHEAD_ROWS = 32  # a read of the fp16 file of this many rows or more ...
COLD_ROW_SECONDS = 4e-6  # ... is read ahead after one that took this long a row (it waited on the disk)
# ... until this many such reads in a row did not wait. A large read of rows on disk that is not
# read ahead waits for each row in turn (585 rows: 30 ms, and seconds where the host's cache
# misses too), and asking for rows already in memory costs ~1 us a row: so one fast read (rows a
# process maps for the first time take ~4 us each) does not end the advice, a slow one restarts it
FAST_READS_TO_STOP = 16
# CLIPSEARCH_LOCK_VECTORS locks the fp16 file this much at a time, the next piece read ahead meanwhile:
# locking faults pages in one small read at a time, the read-ahead asks for the piece at once
LOCK_PIECE = 64 << 20

log = logging.getLogger("clipsearch.index")


class SaveCancelled(Exception):
    """An index file's writing was stopped (``VectorIndex.save``'s ``cancel``): the index is about
    to change, so the file would be out of date when it landed. The file it was to replace stays."""


class _FileWriter:
    """A new file filled through ``write`` (FAISS's callback writer, NumPy's ``save``) and sent
    to disk every ``SAVE_PIECE`` bytes; ``write`` raises SaveCancelled once ``cancel`` is set."""

    def __init__(self, path: Path, cancel: threading.Event | None):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.cancel = cancel
        self.unsynced = 0
        self.written = 0

    def write(self, data: bytes | memoryview) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise SaveCancelled
        view = memoryview(data).cast("B")
        size = view.nbytes
        while view:
            view = view[os.write(self.fd, view) :]
        self.unsynced += size
        self.written += size
        if self.unsynced >= SAVE_PIECE:
            self.sync()
        return size

    def sync(self) -> None:
        _datasync(self.fd)
        self.unsynced = 0

    def close(self) -> None:
        os.close(self.fd)


def write_file(path: Path, fill: Callable[[_FileWriter], None], cancel: threading.Event | None = None) -> bool:
    """Write ``path`` anew: ``fill`` writes into a temporary file beside it, which replaces it in
    one rename (readers never see a half-written file). One of ``SAVE_PIECE`` or more is on disk
    before it does; returns whether it was, so that the caller syncs the folder once its renames
    are done. ``cancel`` set meanwhile stops the write (SaveCancelled); the old file stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # named by this process (another may be writing the same file) and by this write
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    out = _FileWriter(tmp, cancel)
    try:
        try:
            fill(out)
            # a file under one piece (a small index, written at every change) is left to the
            # kernel: a sync there would cost each search after a write, and a file a crash
            # broke is derived data, rebuilt when it cannot be read
            large = out.written >= SAVE_PIECE
            if large:
                out.sync()
        finally:
            out.close()
        os.replace(tmp, path)
    except SaveCancelled:
        # removed beside whatever stopped the write: freeing a large file's blocks takes ext4
        # a while (0.6 s for 800 MB here), and the file is no longer read
        threading.Thread(target=tmp.unlink, kwargs={"missing_ok": True}, name="clipsearch-unlink").start()
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return large


def _datasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)  # macOS and Windows have no fdatasync


def sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: the folder's entry is data of its own)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def faiss_installed() -> bool:
    """Whether FAISS can be imported (asked without importing it)."""
    try:
        return importlib.util.find_spec("faiss") is not None
    except (ImportError, ValueError):
        return False


def _faiss() -> Any:
    """FAISS, imported when an HNSW or IVF-PQ index is first built, read or searched: the exact
    index and commands that only read the store (``info``, keyword search) never load it."""
    try:
        import faiss
    except ImportError:
        raise MissingExtraError("an HNSW or IVF-PQ index (FAISS)", "faiss") from None

    if not _MAX_THREADS:
        _MAX_THREADS.append(faiss.omp_get_max_threads())
    return faiss


# A filter that lets at most this many ids through is scored exactly on an HNSW or IVF index
# (about 20 ms for 100k x 512 on 2 cores): always right, and cheaper than a walk wide enough to be.
EXACT_FILTER_ROWS = 100_000
IVF_EXACT_FILTER_ROWS = 2_000
PG_EXACT_FILTER_ROWS = 10_000
MAX_FILTER_EF = 4096  # the widest walk a less selective filter gets before the exact fallback
_EXACT_CHUNK = 8192  # ids scored at a time: 16 MiB of 512-d vectors
_EXACT_QUERIES = 1024  # queries an exact index scores at a time
_RERANK_QUERIES = 64  # queries re-ranked at a time: 32 MiB of 512-d candidates
# A filtered IVF-PQ search visits the lists that hold allowed rows, nearest first, until they
# hold FILTER_PROBE_WIDEN times the share of the allowed rows that an unfiltered search's lists
# hold of all rows (nprobe / nlist), and at least FILTER_MIN_ROWS of them; and every list where
# allowed rows are FILTER_DENSE times as common as in the collection (a filter that follows topics).
FILTER_PROBE_WIDEN = 4
FILTER_MIN_ROWS = 2048
FILTER_DENSE = 4


# An unfiltered IVF-PQ search of a few queries whose lists hold at least this many codes splits
# each query's lists over FAISS's threads (VectorIndex._split_scan): ~17 ns a 128-byte code on one
# core, so a scan of 200k codes takes ~3.5 ms alone
SPLIT_SCAN_CODES = 200_000
SPLIT_CENTROIDS = 4096  # ... and its centroids' scan, where it has at least this many lists
_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _scan_pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max_workers=_MAX_THREADS[0], thread_name_prefix="clipsearch-scan"))
        return _POOL[0]


# -- sizes -------------------------------------------------------------------------------------
def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def machine_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # a platform that does not say: assume a small machine


def ivf_shape(count: int, dim: int) -> tuple[int, int]:
    """(lists, PQ sub-quantisers) for an IVF-PQ index over ``count`` vectors: about 4·√n lists,
    and above ~6M vectors one for every ``IVF_LIST_ROWS`` (a power of two, rounded down, at least
    39 training vectors each, at most ``MAX_NLIST``: 2,048 at 1M, 16,384 at 10M, where 4,096
    lists put only 0.88 of text queries' true top 10 in the 128 lists they visit, and 16,384 put
    0.98 in 512 lists of 0.48M codes in all; `benchmarks/ivf_lists.py`), and one 4-bit
    code for every 2 dimensions of each vector's residual from its list's centroid (PQ256x4fsr for
    512-d: 128 bytes a vector), 32 codes at least. One for every 4 dimensions (64 bytes, coding
    the vectors themselves) missed a third of the true top 10 of image queries in
    `benchmarks/scale.py`'s dense topics even after re-ranking 256 candidates."""
    target = min(max(4 * math.sqrt(max(count, 1)), count / IVF_LIST_ROWS), count / 39, MAX_NLIST)
    nlist = 1 << max(0, int(math.log2(max(target, 1))))
    # at least 32 codes: a small vector's few 4-bit codes rank too coarsely for re-ranking to mend
    want = max(dim // 2, min(dim, 32))
    m = next(d for d in range(want, 0, -1) if dim % d == 0)
    return nlist, m


def estimate_memory(kind: str, count: int, dim: int, hnsw_m: int = DEFAULT_HNSW_M) -> int:
    """Bytes an index of ``kind`` holds in memory for ``count`` vectors."""
    if kind == "flat":
        return count * (dim * 4 + 8)
    if kind == "hnsw":
        # fp32 vectors, 2·M level-0 links, the upper levels (1/M of the nodes, M links each),
        # IDMap2's id array and its reverse hash map
        return int(count * (dim * 4 + hnsw_m * 8 * (1 + 1 / hnsw_m) + 8 + 48))
    nlist, m = ivf_shape(count, dim)
    return count * (m // 2 + 8) + nlist * dim * 4  # codes + ids, and the centroids


# -- settings ----------------------------------------------------------------------------------
@dataclass
class IndexSettings:
    kind: str = "auto"  # auto | flat | hnsw | ivfpq
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD
    hnsw_m: int = DEFAULT_HNSW_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    ef_search: int = 0  # HNSW's efSearch; 0: by the index's size (hnsw_ef), PostgreSQL's DEFAULT_EF_SEARCH
    exact_filter_rows: int = EXACT_FILTER_ROWS  # see _search_allowed
    memory: int = 0  # bytes an index may hold in memory; 0: DEFAULT_MEMORY_SHARE of the machine's
    nprobe: int = 0  # IVF lists searched; 0: by the number of lists (see VectorIndex.nprobe)
    rerank: int = 0  # IVF-PQ candidates re-scored; 0: by the lists' size (see VectorIndex.rerank)
    search_threads: int = 0  # threads one query's IVF-PQ scan may use; 0: FAISS's (see _split_scan)
    pg_build_workers: int = 0  # PostgreSQL parallel workers for an HNSW build; 0: the server's max_parallel_workers
    # a PostgreSQL filter's rows scored exactly at most (more walk the HNSW index): PostgreSQL scores
    # ~4.5 us a 512-d halfvec row (10,000 in ~45 ms on 2 cores), FAISS from memory ~20x faster
    pg_exact_filter_rows: int = PG_EXACT_FILTER_ROWS
    lock_vectors: bool = False  # the vectors a search reads stay in memory (see VectorIndex.keep_resident)

    def __post_init__(self) -> None:
        if self.kind not in ("auto", *KINDS):
            raise UsageError(f"unknown index kind {self.kind!r}; use auto, flat, hnsw or ivfpq")
        if not self.memory:
            self.memory = int(machine_memory() * DEFAULT_MEMORY_SHARE)

    @classmethod
    def of(cls, s: Settings) -> IndexSettings:
        """The index part of the settings (``CLIPSEARCH_INDEX``, ``CLIPSEARCH_HNSW_*``, ...)."""
        memory = parse_size(s.index_memory) if s.index_memory else 0
        return cls(
            s.index, s.hnsw_threshold, s.hnsw_m, s.ef_construction, s.ef_search,
            memory=memory, nprobe=s.ivf_nprobe, rerank=s.ivf_rerank, search_threads=s.search_threads,
            pg_build_workers=s.pg_build_workers,
            pg_exact_filter_rows=s.pg_exact_filter_rows, lock_vectors=s.lock_vectors,
        )  # fmt: skip

    def hnsw_ef(self, count: int) -> int:
        """The efSearch of a walk over an HNSW graph of ``count`` vectors: ``ef_search`` where set,
        else 128 up to 100,000 vectors, growing as count^0.8 above (807 at 1M, 2,048 at most). A
        graph ten times larger needs a longer walk for the same recall, and text queries, which
        lie far from every image, most: at 1M on benchmarks/scale.py's set efSearch 128 found
        0.846 of text queries' true top 10 (0.928 of image queries'), 512 found 0.945 (0.979),
        807 0.975 (0.988) in ~5 ms, where 128 was enough at 100k (0.982)."""
        if self.ef_search:
            return self.ef_search
        grown = DEFAULT_EF_SEARCH * (max(count, 1) / EF_BY_SIZE_BASE) ** EF_BY_SIZE_POWER
        return int(min(MAX_EF_BY_SIZE, max(DEFAULT_EF_SEARCH, grown)))

    @property
    def fixed_ef(self) -> int:
        """``ef_search`` where set, else 128, whatever the size: PostgreSQL's ``hnsw.ef_search``
        (pgvector found 0.905 / 0.949 of the true top 10 at 1M with it; hnsw_ef's rule is FAISS's,
        measured there), and what a filtered FAISS walk widens from (see _search_allowed)."""
        return self.ef_search or DEFAULT_EF_SEARCH

    def choose(self, count: int, dim: int, current: str | None = None, faiss: bool | None = None) -> tuple[str, str]:
        """The kind of index for ``count`` vectors, and why. ``current``, the kind the namespace
        has now, is kept a little past the point where it would not be chosen, so that a few
        deletions do not rebuild a large index as another kind. ``faiss``: whether FAISS is
        installed (asked when None); without it the index is exact while it fits the budget, and
        beyond that this says which extra to install."""
        if faiss is None:
            faiss = faiss_installed()
        if self.kind != "auto":
            if self.kind != "flat" and not faiss:
                raise MissingExtraError(f"an index of kind {self.kind!r} (FAISS)", "faiss")
            return self.kind, "asked for (--kind or CLIPSEARCH_INDEX)"
        threshold = self.hnsw_threshold // 2 if current in ("hnsw", "ivfpq") else self.hnsw_threshold
        if count < threshold:
            return "flat", f"{count:,} vectors, fewer than {self.hnsw_threshold:,}: exact search"
        if not faiss:
            flat = estimate_memory("flat", count, dim)
            if flat > self.memory:
                raise MissingExtraError(
                    f"searching {count:,} vectors within the memory budget of {format_size(self.memory)} "
                    f"(CLIPSEARCH_INDEX_MEMORY; an exact index would hold ~{format_size(flat)}) takes an "
                    "IVF-PQ index, which",
                    "faiss",
                )
            return "flat", (
                f"{count:,} vectors, searched exactly: FAISS is not installed "
                "(pip install 'clipsearch[faiss]' for HNSW or IVF-PQ, faster past "
                f"{self.hnsw_threshold:,})"
            )
        hnsw = estimate_memory("hnsw", count, dim, self.hnsw_m)
        budget = self.memory // 2 if current == "ivfpq" else self.memory
        if hnsw <= budget:
            return "hnsw", (
                f"HNSW over {count:,} vectors needs ~{format_size(hnsw)}, within the memory budget of "
                f"{format_size(self.memory)}"
            )
        ivf = estimate_memory("ivfpq", count, dim)
        return "ivfpq", (
            f"HNSW over {count:,} vectors would need ~{format_size(hnsw)}, over the memory budget of "
            f"{format_size(self.memory)} (CLIPSEARCH_INDEX_MEMORY); IVF-PQ holds ~{format_size(ivf)} "
            "and re-ranks from fp16 vectors on disk"
        )


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
    reason: str = ""  # why this kind (IndexSettings.choose)
    asked: bool = False  # the kind was asked for (index build --kind), not chosen by size
    # IVF-PQ: its fp16 vector file (a token new with each build) and the rows of it this index
    # covers, the vectors it was trained on, and its number of lists
    vector_file: str = ""
    file_rows: int = 0
    trained_on: int = 0
    nlist: int = 0

    @property
    def live(self) -> int:
        return self.count - len(self.dead)

    @property
    def memory(self) -> int:
        return estimate_memory(self.kind, self.count, self.dim)


class VectorFile:
    """fp16 vectors in seq order with their seqs, memory-mapped: ``<index>.<token>.f16`` and
    ``.seq`` beside the index. Append-only; rows that leave the index stay until a rebuild
    writes a new file under a new token. Rows are written at the offset the index's state
    names, not at the end: two processes that catch the same index up from the same table write
    the same bytes at the same place, and one that still holds an older build's token finds its
    file gone (FileNotFoundError) instead of writing into the new one."""

    def __init__(self, base: Path, token: str, dim: int, rows: int):
        self.base, self.token, self.dim, self.rows = base, token, dim, rows
        # the mapping (None: no rows) and its rows, one attribute: what lock takes while an append remaps
        self._mapped: tuple[mmap.mmap | None, np.ndarray] = (None, np.zeros((0, dim), dtype=np.float16))
        self._fast = 0  # large reads in a row that did not wait on the disk (see read16)
        self._locked: mmap.mmap | None = None  # the mapping whose pages are locked in memory (see lock)
        self._first, self._dense = 0, False
        self._map()

    @staticmethod
    def paths(base: Path, token: str) -> tuple[Path, Path]:
        stem = base.with_suffix("")
        return stem.with_name(f"{stem.name}.{token}.f16"), stem.with_name(f"{stem.name}.{token}.seq")

    @classmethod
    def create(cls, base: Path, dim: int) -> VectorFile:
        token = uuid.uuid4().hex[:12]
        base.parent.mkdir(parents=True, exist_ok=True)
        for p in cls.paths(base, token):
            p.write_bytes(b"")
        return cls(base, token, dim, 0)

    @classmethod
    def open(cls, base: Path, token: str, dim: int, rows: int) -> VectorFile | None:
        vec, seq = cls.paths(base, token)
        try:
            if vec.stat().st_size < rows * dim * 2 or seq.stat().st_size < rows * 8:
                return None
        except OSError:
            return None
        return cls(base, token, dim, rows)

    def _map(self) -> None:
        vec, seq = self.paths(self.base, self.token)
        if self.rows:
            with vec.open("rb") as f:  # the mapping outlives the descriptor
                pages = mmap.mmap(f.fileno(), self.rows * self.dim * 2, access=mmap.ACCESS_READ)
            self._mapped = (pages, np.frombuffer(pages, dtype=np.float16).reshape(self.rows, self.dim))
            self.seqs = np.memmap(seq, dtype=np.int64, mode="r", shape=(self.rows,))
            # rows appended without a gap in their seqs (a build, adds): a seq's row is its offset
            # from the first, found without a binary search (~1 ms for 700 rows at 10M)
            self._first = int(self.seqs[0])
            self._dense = int(self.seqs[-1]) - self._first + 1 == self.rows
        else:  # mmap cannot map nothing
            self._mapped = (None, np.zeros((0, self.dim), dtype=np.float16))
            self.seqs = np.zeros(0, dtype=np.int64)

    @property
    def vectors(self) -> np.ndarray:
        """The rows, memory-mapped float16 (rows x dim)."""
        return self._mapped[1]

    @property
    def _mmap(self) -> mmap.mmap | None:
        return self._mapped[0]

    def append(self, seqs: np.ndarray, vectors: np.ndarray) -> None:
        vec, seq = self.paths(self.base, self.token)
        for path, data, width in (
            (vec, np.ascontiguousarray(vectors, dtype=np.float16), self.dim * 2),
            (seq, np.ascontiguousarray(seqs, dtype=np.int64), 8),
        ):
            fd = os.open(path, os.O_WRONLY)  # no O_CREAT: a file a rebuild removed stays removed
            try:
                os.pwrite(fd, data.tobytes(), self.rows * width)
            finally:
                os.close(fd)
        self.rows += len(seqs)
        self._map()

    def read16(self, seqs: np.ndarray) -> np.ndarray:
        """The vectors of ``seqs`` as stored, float16 (each in the file: the seqs are sorted, so a
        binary search finds its row)."""
        if not len(seqs):
            return np.zeros((0, self.dim), dtype=np.float16)
        if self._dense:
            rows = np.asarray(seqs, dtype=np.int64) - self._first
            found = (rows >= 0) & (rows < self.rows)
        else:
            rows, found = _positions(self.seqs, seqs)
        if not found.all():
            raise RuntimeError(f"{self.paths(self.base, self.token)[0]} lacks vectors its index holds")
        if len(rows) < READ_AHEAD_ROWS or self.locked:
            return self.vectors.take(rows, axis=0)
        if self.reads_ahead:
            self._read_ahead(rows)
        started = time.perf_counter()
        out = self.vectors.take(rows, axis=0)
        waited = time.perf_counter() - started > COLD_ROW_SECONDS * len(rows)
        self._fast = 0 if waited else self._fast + 1
        return out

    @property
    def reads_ahead(self) -> bool:
        """Whether the next large read asks for its rows ahead (see ``FAST_READS_TO_STOP``)."""
        return self._fast < FAST_READS_TO_STOP

    def _read_ahead(self, rows: np.ndarray) -> None:
        """Ask the kernel for the pages of ``rows`` all at once (``MADV_WILLNEED``: it reads them
        concurrently, in the background) before they are gathered, which would fault them in one
        at a time. At 10M rows, 600 random rows not in the page cache took 17-228 ms to gather,
        and 5-13 ms so; where they are cached the advice is wasted (~1 us a row), so it is given
        until ``FAST_READS_TO_STOP`` large reads in a row did not wait on the disk."""
        if self._mmap is None or not hasattr(mmap, "MADV_WILLNEED"):
            return  # a platform without madvise (Windows) reads them as they come
        page, width = mmap.PAGESIZE, self.dim * 2
        starts = rows.astype(np.int64) * width
        first = starts // page * page
        for at, length in zip(first.tolist(), (starts + width - first).tolist(), strict=True):
            self._mmap.madvise(mmap.MADV_WILLNEED, at, length)

    @property
    def locked(self) -> bool:
        """Whether the rows are locked in memory through the mapping searches read (see ``lock``)."""
        return self._mmap is None or self._locked is self._mmap

    @property
    def locked_bytes(self) -> int:
        return 0 if self._locked is None else len(self._locked)

    def lock(self) -> float:
        """Keep every row in memory: lock the pages of the mapping searches read (mlock), which
        reads them in, a piece at a time with the next asked for ahead (``LOCK_PIECE``), and
        maps each in this process: no search then waits on the disk for a row, nor faults one in
        (through a mapping whose pages are in memory but not mapped, a query's 585 rows took 2.3
        ms to gather the first time, against 1.45 ms through the locked one). An append maps the
        file anew; the mapping locked before holds the pages in memory until the next call has
        locked the new one (those pages are in memory by then: ~0.5 s at 10M). Safe beside
        searches and an append on other threads. Returns the seconds it took; MemoryLockError
        where the system refuses (what this call locked is then let go)."""
        pages, vectors = self._mapped  # held here: an append may replace them meanwhile
        if pages is None or pages is self._locked:
            return 0.0
        started = time.perf_counter()
        path, size = str(self.paths(self.base, self.token)[0]), len(pages)
        libc = _libc()
        if libc is None:
            raise MemoryLockError(path, size, None, "this platform has no mlock")
        limit = _raise_memlock_limit(size)
        address = vectors.ctypes.data
        for at in range(0, size, LOCK_PIECE):
            n = min(LOCK_PIECE, size - at)
            if at + n < size and hasattr(mmap, "MADV_WILLNEED"):
                pages.madvise(mmap.MADV_WILLNEED, at + n, min(LOCK_PIECE, size - at - n))
            if libc.mlock(ctypes.c_void_p(address + at), n) != 0:
                reason = os.strerror(ctypes.get_errno())
                libc.munlock(ctypes.c_void_p(address), at + n)
                raise MemoryLockError(path, size, limit, f"the system refused to lock them ({reason})")
        self._locked = pages  # the mapping locked before lets its pages go: this one holds them now
        return time.perf_counter() - started

    def rewrite(self, keep: Callable[[np.ndarray], np.ndarray], cancel: threading.Event | None = None) -> VectorFile:
        """A new file, under a new token, of the rows whose seqs ``keep`` (seqs -> mask) lets
        through, in the same order: this file read through once, ``SAVE_PIECE`` at a time (the
        next piece asked for ahead), and written as an index file is (``write_file``: on disk
        before it is named). This file stays as it is. ``cancel`` set meanwhile stops it
        (SaveCancelled), leaving nothing new behind."""
        token = uuid.uuid4().hex[:12]
        vec, seq = self.paths(self.base, token)
        pages, vectors = self._mapped  # held: the mapping this reads stays while it does
        seqs = self.seqs
        step = max(1, SAVE_PIECE // (self.dim * 2))
        kept: list[np.ndarray] = []

        def fill(out: _FileWriter) -> None:
            for start in range(0, self.rows, step):
                ahead = (start + step) * self.dim * 2 // mmap.PAGESIZE * mmap.PAGESIZE  # madvise's unit
                if pages is not None and ahead < len(pages) and hasattr(mmap, "MADV_WILLNEED"):
                    pages.madvise(mmap.MADV_WILLNEED, ahead, min(SAVE_PIECE + mmap.PAGESIZE, len(pages) - ahead))
                part = np.asarray(seqs[start : start + step])
                mask = keep(part)
                kept.append(part[mask])
                out.write(np.ascontiguousarray(vectors[start : start + step][mask]).reshape(-1))

        try:
            large = write_file(vec, fill, cancel)
            rows = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
            large = write_file(seq, lambda out: out.write(rows.astype(np.int64)), cancel) or large
        except BaseException:
            vec.unlink(missing_ok=True)
            raise
        if large:
            sync_folder(vec.parent)
        return VectorFile(self.base, token, self.dim, len(rows))

    @classmethod
    def remove(cls, base: Path, token: str) -> None:
        for path in cls.paths(base, token):
            path.unlink(missing_ok=True)

    @classmethod
    def remove_except(cls, base: Path, token: str | None) -> None:
        """Delete the vector files of the index at ``base`` other than ``token``'s: earlier
        builds' (a process still reading one keeps its mapping; one that would append to it finds
        it gone and reloads), or all of them once the index is of another kind."""
        stem = base.with_suffix("")
        for p in stem.parent.glob(f"{stem.name}.*.f16"):
            other = p.name[len(stem.name) + 1 : -len(".f16")]
            if other != token and re.fullmatch(r"[0-9a-f]{12}", other):
                cls.remove(base, other)


@functools.cache
def _libc() -> Any:
    """The C library's mlock and munlock (None where there are none: Windows)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        functions = (libc.mlock, libc.munlock)
    except (OSError, TypeError, AttributeError):
        return None
    for f in functions:
        f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    return libc


def _raise_memlock_limit(need: int) -> int | None:
    """This process's locked-memory limit in bytes (None: unlimited), its soft limit first raised
    to the hard one where it is below ``need``. A process with CAP_IPC_LOCK (root) is not held to it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    if _can_lock_beyond_limit():
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < need and hard != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            soft = hard
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _can_lock_beyond_limit() -> bool:
    """Whether this process holds CAP_IPC_LOCK (Linux), which no locked-memory limit binds."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    found = re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.MULTILINE)
    return bool(found) and bool(int(found.group(1), 16) >> 14 & 1)  # CAP_IPC_LOCK is capability 14


class ExactIndex:
    """The exact index: every vector (float32) with its seq, in seq order, scored by a matrix
    product a bounded chunk at a time and a top-k, which is all FAISS's ``IndexFlatIP`` does
    (both are BLAS's sgemm), in NumPy alone: the core install searches without FAISS. Saved as
    two ``.npy`` arrays (seqs, then vectors) in one file, so that one rename replaces both."""

    def __init__(self, dim: int):
        self.dim = dim
        self.ntotal = 0
        self._seqs = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, dim), dtype=np.float32)

    @property
    def seqs(self) -> np.ndarray:
        return self._seqs[: self.ntotal]

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors[: self.ntotal]

    def add(self, seqs: np.ndarray, vectors: np.ndarray) -> None:
        total = self.ntotal + len(seqs)
        if total > len(self._seqs):
            # room to grow by a quarter: a catch-up appends 50k rows a time, and a copy of the
            # whole matrix for each would make building quadratic; doubling would hold up to
            # twice the vectors' memory
            capacity = max(total, len(self._seqs) * 5 // 4, 1024)
            grown_seqs = np.empty(capacity, dtype=np.int64)
            grown = np.empty((capacity, self.dim), dtype=np.float32)
            grown_seqs[: self.ntotal], grown[: self.ntotal] = self.seqs, self.vectors
            self._seqs, self._vectors = grown_seqs, grown
        in_order = not self.ntotal or int(seqs.min()) > int(self._seqs[self.ntotal - 1])
        self._seqs[self.ntotal : total] = seqs
        self._vectors[self.ntotal : total] = vectors
        self.ntotal = total
        if not in_order or not np.all(np.diff(seqs) > 0):
            order = np.argsort(self.seqs, kind="stable")
            self._seqs[:total], self._vectors[:total] = self.seqs[order], self.vectors[order]

    def remove(self, seqs: np.ndarray) -> int:
        keep = ~np.isin(self.seqs, seqs)
        kept = int(keep.sum())
        removed = self.ntotal - kept
        if removed:
            self._seqs[:kept], self._vectors[:kept] = self.seqs[keep], self.vectors[keep]
            self.ntotal = kept
        return removed

    def rows(self, seqs: np.ndarray) -> np.ndarray:
        """The rows of those of ``seqs`` this index holds."""
        rows, found = _positions(self.seqs, seqs)
        return rows[found]

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if len(queries) > _EXACT_QUERIES:  # bounded score matrices however many queries come
            step = _EXACT_QUERIES
            parts = [self.search(queries[i : i + step], k, allowed) for i in range(0, len(queries), step)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if allowed is None:
            # contiguous slices of the matrix: scored in place, nothing gathered
            step = _exact_step(len(queries), self.dim)
            chunks: Iterable[tuple[np.ndarray, np.ndarray]] = (
                (self.seqs[i : i + step], self.vectors[i : i + step]) for i in range(0, self.ntotal, step)
            )
        else:
            rows = self.rows(np.asarray(allowed, dtype=np.int64))
            step = _exact_step(len(queries), self.dim, gathered=True)
            chunks = (
                (self.seqs[rows[i : i + step]], self.vectors[rows[i : i + step]]) for i in range(0, len(rows), step)
            )
        return top_k(queries, k, chunks)

    def save(self, out: Any) -> None:
        """Write to ``out`` (a binary file, or anything with its ``write``)."""
        np.save(out, self.seqs)
        np.save(out, self.vectors)

    @classmethod
    def read(cls, path: Path, dim: int) -> ExactIndex:
        """Raises ValueError for a file that is not one (an index FAISS wrote, before the exact
        index was NumPy's: it is rebuilt)."""
        with open(path, "rb") as f:
            seqs = np.load(f, allow_pickle=False)
            vectors = np.load(f, allow_pickle=False)
        if seqs.dtype != np.int64 or vectors.dtype != np.float32 or vectors.shape != (len(seqs), dim):
            raise ValueError(f"{path} is not an exact index of {dim}-d vectors")
        index = cls(dim)
        index._seqs, index._vectors, index.ntotal = seqs, vectors, len(seqs)
        return index


def _positions(held: np.ndarray, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``seqs`` would sit in ``held`` (sorted seqs), and whether it is there."""
    if not len(held):
        return np.zeros(len(seqs), dtype=np.int64), np.zeros(len(seqs), dtype=bool)
    rows = np.minimum(np.searchsorted(held, seqs), len(held) - 1)
    return rows, held[rows] == seqs


def _exact_step(queries: int, dim: int, gathered: bool = False) -> int:
    """Rows scored at a time: a score matrix of at most 4M floats (16 MiB), and, where rows are
    gathered (copied) rather than sliced, at most ``_EXACT_CHUNK`` of them."""
    step = max(1024, 4_000_000 // max(queries, 1))
    return min(step, _EXACT_CHUNK) if gathered else step


def top_k(
    queries: np.ndarray, k: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (score, seq) of each query over ``chunks`` of (seqs, vectors), by exact
    inner product, best first, ties by seq; seq -1 (score -inf) where fewer than k rows came."""
    n = len(queries)
    scored = ((queries @ vectors.T, np.broadcast_to(seqs, (n, len(seqs)))) for seqs, vectors in chunks)
    return _best_of(n, k, scored)


def _best_of_parts(parts: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (score, id) of each row over the threads' ``parts`` of (scores, ids), each
    (n, k or more between them), in no order."""
    parts = list(parts)
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)


def _best_of(n: int, k: int, scored: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (score, seq) of each of ``n`` queries over ``scored`` chunks of (scores,
    seqs), each (n, rows), best first, ties by seq; seq -1 (score -inf) where fewer than k came."""
    best_scores = np.full((n, k), -np.inf, dtype=np.float32)
    best_seqs = np.full((n, k), -1, dtype=np.int64)
    for scores, seqs in scored:
        if not seqs.shape[1] or not k:
            continue
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_seqs, seqs], axis=1)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # k kept + a non-empty chunk: more than k
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_seqs = np.take_along_axis(ids, top, axis=1)
    return _sorted(best_scores, best_seqs)


class VectorIndex:
    """An index over (int64 sequence number -> vector): an ``ExactIndex``, or FAISS's HNSW or
    IVF-PQ."""

    def __init__(self, index: Any, state: IndexState, settings: IndexSettings, file: VectorFile | None = None):
        self.index = index
        self.state = state
        self.settings = settings
        self.file = file  # IVF-PQ's fp16 vectors
        self.mapped: Path | None = None  # HNSW read memory-mapped from this file (see _own)
        self.unsaved = 0  # rows added or removed since the file was written (or read)
        self._dead_selector: tuple[Any, ...] | None = None  # HNSW: built once per set of tombstones
        self._allowed: dict[int, _Allowed] = {}  # per allow-list, while this index is unchanged
        self._list_of: np.ndarray | None = None  # IVF-PQ: the list each seq is in (-1: none)
        self._held: tuple[np.ndarray, np.ndarray | None, np.ndarray] | None = None  # HNSW: _held_seqs
        self._sizes = np.zeros(0, dtype=np.int64)  # IVF-PQ: rows in each list, with _list_of
        self._assigner: Any = None  # IVF-PQ with many lists: an HNSW graph of its centroids (_assigning)
        self._locking: _Locking | None = None  # lock_vectors: the lock of the fp16 file under way
        self._lock_error: MemoryLockError | None = None  # ... or why it could not be done
        self._locking_guard = threading.Lock()

    @property
    def small(self) -> bool:
        """Written whenever it changes (``SAVE_ALWAYS_BELOW``); a larger one once enough changed."""
        return self.state.live < SAVE_ALWAYS_BELOW

    def worth_saving(self) -> bool:
        """Whether a large index changed enough since its file was written (``SAVE_CHANGED_SHARE``)."""
        return self.unsaved >= SAVE_CHANGED_SHARE * self.state.live

    @classmethod
    def empty(
        cls,
        kind: str,
        dim: int,
        settings: IndexSettings,
        *,
        path: Path | None = None,
        count: int = 0,
        sample: Callable[[int], np.ndarray] | None = None,
    ) -> VectorIndex:
        """A new, empty index. IVF-PQ is trained first, on ``sample(n)`` (n vectors drawn from
        the ``count`` it is built for), and keeps its fp16 vectors beside ``path``."""
        state = IndexState(kind=kind, dim=dim, count=0, generation=0, rebuild_generation=0, max_seq=0)
        if kind == "flat":
            return cls(ExactIndex(dim), state, settings)
        faiss = _faiss()
        if kind == "ivfpq":
            if count < IVF_MIN_VECTORS or sample is None or path is None:
                raise UsageError(
                    f"an IVF-PQ index is trained on the vectors it holds and needs at least {IVF_MIN_VECTORS} "
                    f"(there are {count}); use the flat or hnsw kind"
                )
            nlist, m = ivf_shape(count, dim)
            # "fsr": each code holds the vector's residual from its list's centroid, not the vector:
            # the residuals spread far less, so the same 4 bits rank the near ties of a dense topic
            # finely. On 1M of `benchmarks/scale.py`'s set (2,048 lists, 64 visited), image queries
            # found 0.954 of their true top 10 after re-ranking 256 candidates, against 0.829 when
            # the codes held the vectors (1,000 candidates: 0.986 against 0.944), at the same cost;
            # an OPQ rotation on top added nothing (0.946) and took 8 minutes to train.
            index = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x4fsr", faiss.METRIC_INNER_PRODUCT)
            if nlist > HNSW_ASSIGN_LISTS:
                want = nlist * IVF_TRAIN_PER_LIST_HNSW
            else:
                want = min(max(nlist * IVF_TRAIN_PER_LIST, 16 * 256), 200_000)
            train = np.ascontiguousarray(sample(min(count, want)), dtype=np.float32)
            faiss.omp_set_num_threads(_MAX_THREADS[0])
            state.trained_on, state.nlist = count, nlist
            file = VectorFile.create(path, dim)
            state.vector_file = file.token
            made = cls(index, state, settings, file)
            made._train(train)
            return made
        inner = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = settings.ef_construction
        return cls(faiss.IndexIDMap2(inner), state, settings)

    def _train(self, train: np.ndarray) -> None:
        """Train IVF-PQ's lists and codes on ``train``. With many lists, k-means assigns the sample
        through an HNSW graph of the centroids (``HNSW_ASSIGN_LISTS``), and so does the training of
        the codes (on each vector's residual from its list's centroid)."""
        faiss = _faiss()
        index = self.index
        # Each list's centroid stays the mean of its vectors, not scaled onto the unit sphere (FAISS's
        # default for inner product): a query's inner product with the mean is the average score of
        # the list's vectors, which ranks the lists better for queries far from every image. On the
        # 10M set, text queries (cosine ~0.3 to their images) found 0.883 of their true top 10 in 128
        # of 4,096 lists against 0.822 on the sphere, and image queries 0.999 against 0.979.
        index.cp.spherical = False
        if index.nlist <= HNSW_ASSIGN_LISTS:
            index.train(train)
            return
        cp = faiss.ClusteringParameters()
        cp.spherical = False
        cp.niter, cp.max_points_per_centroid = 10, IVF_TRAIN_PER_LIST_HNSW
        cp.min_points_per_centroid = IVF_TRAIN_PER_LIST_HNSW // 2  # FAISS warns below 39, by design here
        clustering = faiss.Clustering(self.state.dim, index.nlist, cp)
        clustering.train(train, faiss.IndexHNSWFlat(self.state.dim, 32, faiss.METRIC_INNER_PRODUCT))
        index.quantizer.add(faiss.vector_float_to_array(clustering.centroids).reshape(index.nlist, -1))
        with self._assigning():  # the lists are set: FAISS only trains the codes
            index.train(train)

    @contextlib.contextmanager
    def _assigning(self) -> Iterator[None]:
        """Within: the index assigns vectors to lists through an HNSW graph of its centroids (built
        once a process, in a few seconds at 16,384 lists), when it has more than ``HNSW_ASSIGN_LISTS``. Searches
        rank the lists with the exact quantiser the file keeps, which is put back after."""
        if self.state.kind != "ivfpq" or self.index.nlist <= HNSW_ASSIGN_LISTS:
            yield
            return
        faiss = _faiss()
        if self._assigner is None:
            graph = faiss.IndexHNSWFlat(self.state.dim, 32, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efSearch = 64
            graph.add(self.index.quantizer.reconstruct_n(0, self.index.nlist))
            self._assigner = graph
        exact = self.index.quantizer
        self.index.quantizer = self._assigner  # borrowed: the index owns only its exact quantiser
        try:
            yield
        finally:
            self.index.quantizer = exact

    def can_grow_to(self, count: int) -> bool:
        """Whether rows can still be appended (IVF-PQ: until it has outgrown its training)."""
        return self.state.kind != "ivfpq" or count <= IVF_REGROW * self.state.trained_on

    @property
    def wasteful(self) -> bool:
        """IVF-PQ: whether its fp16 file is mostly rows it no longer holds (``MAX_FILE_WASTE``),
        so that the next ``save`` rewrites it first."""
        wasted = self.state.file_rows - self.state.count
        return self.file is not None and wasted > MAX_FILE_WASTE * max(self.state.file_rows, 1)

    def compact_file(self, cancel: threading.Event | None = None) -> None:
        """Rewrite IVF-PQ's fp16 file with only the rows the index holds (``VectorFile.rewrite``)
        and search from it: the lists and codes stay as they are. Searches go on meanwhile (on the
        old file until the new one is in place); the old file is removed when the index that names
        the new one is saved. ``cancel``: SaveCancelled, and the old file still in use."""
        assert self.file is not None
        started, before = time.perf_counter(), self.file.rows
        held = self._lists()
        file = self.file.rewrite(lambda seqs: held[seqs] >= 0, cancel)
        if file.rows != self.state.count:  # a change to the index stops this before it is made
            VectorFile.remove(file.base, file.token)
            raise RuntimeError(f"the fp16 rewrite of {file.base} kept {file.rows} rows of {self.state.count}")
        self.file = file
        self.state.vector_file, self.state.file_rows = file.token, file.rows
        self.unsaved += 1  # the state names the new file: saved by the caller
        log.info(
            "rewrote the fp16 vectors of %s without removed rows: %s of %s rows kept, in %.1f s",
            self.file.base, f"{file.rows:,}", f"{before:,}", time.perf_counter() - started,
        )  # fmt: skip

    def add(self, seqs: np.ndarray, vectors: np.ndarray) -> None:
        if len(seqs):
            seqs = seqs.astype(np.int64)
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            if isinstance(self.index, ExactIndex):
                self.index.add(seqs, vectors)
            else:
                if self.mapped is not None:
                    self._own()
                # a search on this thread may have left FAISS at one thread (below): building an
                # HNSW graph with it took 75 s instead of 45 s at 100k vectors on 2 cores
                _faiss().omp_set_num_threads(_MAX_THREADS[0])
                if self.file is not None:
                    self.file.append(seqs, vectors)
                    self.state.file_rows = self.file.rows
                with self._assigning():
                    self.index.add_with_ids(vectors, seqs)
            self.unsaved += len(seqs)
            self.state.count = int(self.index.ntotal)
            self.state.max_seq = max(self.state.max_seq, int(seqs.max()))
            self._changed()

    def _own(self) -> None:
        """Read a memory-mapped HNSW index into this process's memory, before it grows: FAISS
        cannot grow a mapped one (it aborts the process). Read from a copy of what this process
        maps: another process may have replaced the file with its own build since."""
        assert self.mapped is not None
        faiss = _faiss()
        copy = self.mapped.with_name(f"{self.mapped.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            faiss.write_index(self.index, str(copy))
            self.index = faiss.read_index(str(copy))
        finally:
            copy.unlink(missing_ok=True)
        self.mapped = None

    def _changed(self) -> None:
        """Forget what was derived from the index's contents (bitmaps, lists' shares)."""
        self._allowed.clear()
        self._list_of = None
        self._held = None

    def add_batches(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        for seqs, vectors in batches:
            self.add(seqs, vectors)

    def remove(self, seqs: np.ndarray) -> int:
        """Take these ids out of search results; ids the index does not hold are ignored. Exact
        and IVF indexes drop them; an HNSW graph cannot lose nodes, so they become tombstones.
        Returns how many ids it held."""
        seqs = np.unique(np.asarray(seqs, dtype=np.int64))
        if not len(seqs) or not self.state.count:
            return 0
        if self.state.kind != "hnsw":
            if isinstance(self.index, ExactIndex):
                removed = self.index.remove(seqs)
            else:
                # a bitmap over the seqs: IDSelectorBatch hashes each id first and then each id
                # the lists hold, 6x the time at a quarter of 4M removed
                selector, _bits = _bitmap_selector(seqs)
                removed = int(self.index.remove_ids(selector))
            self.state.count = int(self.index.ntotal)
            self.unsaved += removed
            self._changed()
            return removed
        held = _faiss().vector_to_array(self.index.id_map)
        new = np.setdiff1d(seqs[np.isin(seqs, held)], np.asarray(self.state.dead, dtype=np.int64))
        if len(new):
            self.state.dead = sorted({*self.state.dead, *new.tolist()})
            self._dead_selector = None
        self.unsaved += len(new)
        return len(new)

    @property
    def dead_share(self) -> float:
        return len(self.state.dead) / self.state.count if self.state.count else 0.0

    @property
    def nprobe(self) -> int:
        """IVF lists a query visits: 1/32 of them, at least 16 and at most ``MAX_NPROBE`` (384 of
        16,384 at 10M)."""
        return _nprobe(self.state, self.settings)

    @property
    def rerank(self) -> int:
        """IVF-PQ candidates a query re-scores exactly: 256, or one in ``RERANK_SHARE`` of the
        codes an unfiltered query scans where that is more. The lists grow with the collection
        (at most 16,384 of them), so a query scans more codes, and 4-bit codes rank the many near
        ties among them coarsely: at 10M vectors, 256 candidates found 0.81 of the true top 10,
        585 0.945-0.961 and 1,024 0.964 (image queries)."""
        return _rerank(self.state, self.settings)

    def keep_resident(self, wait: bool = False) -> None:
        """With ``lock_vectors``, lock IVF-PQ's fp16 vectors in memory (``VectorFile.lock``) on a
        thread of its own, started by the first search (and by ``prepare_search``), which goes on
        meanwhile: a 10M index answers in ~1.5 s, and reading in its 10 GB takes 8-12 s here.
        ``wait``: return once they are locked (a server does before it says it is healthy). A
        lock the system refused raises MemoryLockError, here and in every search after: the
        vectors were asked to be in memory, and are not. An exact index is in memory anyway, and
        ``load`` reads HNSW in rather than memory-mapping it."""
        file = self.file
        if not self.settings.lock_vectors or file is None:
            return
        while True:
            with self._locking_guard:
                if self._lock_error is not None:
                    raise self._lock_error
                locking = self._locking
                if locking is None:
                    if file.locked:
                        return
                    locking = self._locking = _Locking(file)
            if wait:
                locking.done.wait()
            if not locking.done.is_set():
                return
            with self._locking_guard:
                if self._locking is locking:  # the first to find it done says how it went
                    self._locking = None
                    if isinstance(locking.error, MemoryLockError):
                        self._lock_error = locking.error
                    elif locking.error is None:
                        log.log(
                            logging.INFO if locking.first else logging.DEBUG,
                            "locked %s of vectors in memory in %.1f s (%s)",
                            format_size(locking.bytes), locking.seconds, file.paths(file.base, file.token)[0],
                        )  # fmt: skip
            if locking.error is not None:
                raise locking.error
            if not wait:
                return  # rows appended while it ran are locked from the next search

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and sequence numbers, shape (n, k); missing neighbours have seq -1. With
        ``allowed`` (the ids a filter lets through) every row holds min(k, len(allowed)) hits."""
        self.keep_resident()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed is not None and self.state.kind != "flat" and self.state.live:
            return self._search_allowed(queries, k, np.asarray(allowed, dtype=np.int64))
        return self._search(queries, k, allowed)

    def _search_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A filtered search on an HNSW or IVF index. A walk that may only stop at allowed nodes
        runs out before it finds them when they are few (recall@10 was 0.43 at 1% of 100k), so:
        up to ``exact_filter_rows`` allowed ids are scored exactly from the stored vectors;
        above, the HNSW walk's ``efSearch`` grows with the selectivity, and IVF-PQ visits the
        lists that hold allowed rows, nearest first, until they hold enough of them; a query that
        still comes back short is scored exactly."""
        want = min(k, len(allowed))
        exact_rows = self.settings.exact_filter_rows
        if self.file is not None:
            # Rows gathered from the fp16 file cost ~1.5 us each (17 ms for 12k), the fast-scan
            # of a list's codes ~5 ns a vector.
            exact_rows = min(exact_rows, max(IVF_EXACT_FILTER_ROWS, self.state.live // 300))
        if len(allowed) <= exact_rows:
            return self.exact(queries, want, allowed)
        view = self._allowed_view(allowed)
        if self.state.kind == "ivfpq":
            scores, seqs = self._search_lists(queries, want, view)
        else:
            widen = -(-self.state.live // len(allowed))  # 1 / selectivity, rounded up
            # widened from 128, not from the unfiltered walk's size-grown effort: at 1M a filter
            # passing 10% at random found 0.984 of its true top 10 with 1,280 (7.5 ms p50), 0.992
            # with 4,096 (29 ms)
            ef = min(MAX_FILTER_EF, max(self.settings.fixed_ef, want) * widen)
            scores, seqs = self._search(queries, want, view.selector, ef=ef)
        short = np.flatnonzero((seqs >= 0).sum(axis=1) < want)
        if len(short):
            scores[short], seqs[short] = self.exact(queries[short], want, allowed)
        return scores, seqs

    def _allowed_view(self, allowed: np.ndarray) -> _Allowed:
        """The selector of ``allowed`` (a bitmap over the seqs: built in milliseconds where
        IDSelectorBatch hashes every id) and, on IVF-PQ, how many of them each list holds; kept
        while the index is unchanged and the store keeps that allow-list (its cache hands the
        same array to every search with the same filter): at 10M rows a bitmap takes ~10 ms."""
        for key in [key for key, view in self._allowed.items() if view.ids() is None]:
            del self._allowed[key]
        view = self._allowed.get(id(allowed))
        if view is not None and view.ids() is allowed:
            return view
        selector, bits = _bitmap_selector(allowed)
        per_list = None
        if self.state.kind == "ivfpq":
            lists = self._lists()
            where = lists[allowed[allowed < len(lists)]]
            per_list = np.bincount(where[where >= 0], minlength=self.state.nlist)
        view = _Allowed(weakref.ref(allowed), selector, bits, per_list)
        self._allowed[id(allowed)] = view
        return view

    def _lists(self) -> np.ndarray:
        """The IVF list that holds each seq (-1: none), read from the inverted lists once per
        state of the index (12 ms at 1M), and the lists' sizes."""
        if self._list_of is None:
            faiss = _faiss()
            invlists = self.index.invlists
            owner = np.full(self.state.max_seq + 1, -1, dtype=np.int16)
            sizes = np.zeros(self.index.nlist, dtype=np.int64)
            for number in range(self.index.nlist):
                sizes[number] = invlists.list_size(number)
                if sizes[number]:
                    owner[faiss.rev_swig_ptr(invlists.get_ids(number), int(sizes[number]))] = number
            self._list_of, self._sizes = owner, sizes
        return self._list_of

    def _search_lists(self, queries: np.ndarray, k: int, view: _Allowed) -> tuple[np.ndarray, np.ndarray]:
        """A filtered IVF-PQ search over the lists that hold allowed rows: nearest first until
        they hold ``FILTER_PROBE_WIDEN`` times the allowed rows' share that an unfiltered search
        visits (and at least ``FILTER_MIN_ROWS``), which finds a filter drawn at random near the
        query; and every list where allowed rows are ``FILTER_DENSE`` times as common as in the
        collection. A filter that follows topics (a category) mostly lives in such lists, and a
        query about another topic finds its top 10 spread over all of them (at 1M, the lists
        nearest the query that held any gave recall@10 0.25). Scanning every list through the
        bitmap, as before, took 15 ms at 1M for a filter passing 10%, growing with the
        collection; this grows with the lists the filter lives in (5 ms)."""
        assert view.per_list is not None
        faiss = _faiss()
        nlist = self.state.nlist
        total = int(view.per_list.sum())
        target = min(total, max(FILTER_MIN_ROWS, math.ceil(total * self.nprobe / nlist * FILTER_PROBE_WIDEN)))
        faiss.omp_set_num_threads(1 if len(queries) < _PARALLEL_QUERIES else _MAX_THREADS[0])
        near, order = self.index.quantizer.search(queries, nlist)  # every list, nearest first
        held = view.per_list[order]
        # the lists up to the one that brings the allowed rows visited to the target, less those
        # that hold none; moved to the front of each row (stable), the rest marked -1
        share = total / max(1, self.state.live)
        dense = view.per_list >= FILTER_DENSE * share * self._sizes
        taken = (held > 0) & ((np.cumsum(held, axis=1) - held < target) | dense[order])
        width = max(1, int(taken.sum(axis=1).max()))
        front = np.argsort(~taken, axis=1, kind="stable")[:, :width]
        assign = np.where(np.take_along_axis(taken, front, axis=1), np.take_along_axis(order, front, axis=1), -1)
        near = np.take_along_axis(near, front, axis=1)
        _, candidates = self._scan_lists(queries, min(total, max(self.rerank, k)), assign, near, view.selector)
        return self._rerank(queries, candidates, k)

    def _scan_lists(
        self, queries: np.ndarray, want: int, assign: np.ndarray, near: np.ndarray, selector: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``want`` best codes' scores and seqs in the given lists of each query (``assign``,
        -1 for none; ``near``, the query's inner product with each list's centroid), through
        ``selector`` (None: every row)."""
        faiss = _faiss()
        assign = np.ascontiguousarray(assign, dtype=np.int64)
        near = np.ascontiguousarray(near, dtype=np.float32)
        n = len(queries)
        scores = np.empty((n, want), dtype=np.float32)
        seqs = np.empty((n, want), dtype=np.int64)
        params = faiss.SearchParametersIVF()
        params.nprobe, params.sel = assign.shape[1], selector
        # FAISS's Python search_preassigned takes no parameters (no selector); its C++ one does
        self.index.search_preassigned_c(
            n, faiss.swig_ptr(queries), want, faiss.swig_ptr(assign), faiss.swig_ptr(near),
            faiss.swig_ptr(scores), faiss.swig_ptr(seqs), False, params,
        )  # fmt: skip
        return scores, seqs

    @property
    def scanned(self) -> int:
        """The codes an unfiltered IVF-PQ query scans, about (its lists' share of the vectors)."""
        return _scanned(self.state, self.settings)

    @property
    def _scan_threads(self) -> int:
        return min(self.settings.search_threads or _MAX_THREADS[0], _MAX_THREADS[0])

    def _split_scan(self, queries: np.ndarray, want: int, selector: Any) -> np.ndarray:
        """The ``want`` best candidates by their codes of a few queries, their lists split over
        FAISS's threads, each scanning every other list (near and far alike). FAISS parallelises
        a search over its queries, so one query scanned its ~0.5M codes at 16,384 lists on one
        core (~9 ms); these threads are Python's, each asking FAISS for one thread, so none is left
        spinning after the scan (FAISS's OpenMP threads spun, and took the cores the next text
        embedding needed)."""
        workers = self._scan_threads
        near, lists = self._nearest_lists(queries, workers)

        def scan(part: int) -> tuple[np.ndarray, np.ndarray]:
            _faiss().omp_set_num_threads(1)
            scores, seqs = self._scan_lists(queries, want, lists[:, part::workers], near[:, part::workers], selector)
            scores[seqs < 0] = -np.inf
            return scores, seqs

        return _best_of_parts(_scan_pool().map(scan, range(workers)), want)[1]

    def _nearest_lists(self, queries: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's ``nprobe`` nearest lists (inner products, list numbers): with many lists
        their centroids are split over the scan threads (16,384 x 512 floats, 32 MB read for
        each query: 2.6 ms on one core, 1.8 ms on two)."""
        faiss = _faiss()
        nprobe, quantizer = self.nprobe, faiss.downcast_index(self.index.quantizer)
        flat_ip = isinstance(quantizer, faiss.IndexFlat) and quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
        if workers < 2 or self.state.nlist < SPLIT_CENTROIDS or not flat_ip:
            return quantizer.search(queries, nprobe)
        nlist, dim = quantizer.ntotal, quantizer.d
        centroids = faiss.rev_swig_ptr(quantizer.get_xb(), nlist * dim).reshape(nlist, dim)  # no copy
        bounds = np.linspace(0, nlist, workers + 1).astype(np.int64)

        def nearest(part: int) -> tuple[np.ndarray, np.ndarray]:
            lo, hi = int(bounds[part]), int(bounds[part + 1])
            k = min(nprobe, hi - lo)
            scores = np.empty((len(queries), k), dtype=np.float32)
            lists = np.empty((len(queries), k), dtype=np.int64)
            faiss.omp_set_num_threads(1)
            faiss.knn_inner_product(
                faiss.swig_ptr(queries), faiss.swig_ptr(centroids[lo:hi]), dim, len(queries), hi - lo, k,
                faiss.swig_ptr(scores), faiss.swig_ptr(lists),
            )  # fmt: skip
            return scores, lists + lo

        return _best_of_parts(_scan_pool().map(nearest, range(workers)), nprobe)

    def exact(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of ``ids`` for each query by exact inner product, from the stored vectors
        (the index's own, or IVF-PQ's fp16 file), a bounded chunk at a time."""
        if self.state.kind == "hnsw":
            return self._exact_hnsw(queries, k, ids)
        chunks = (np.ascontiguousarray(ids[i : i + _EXACT_CHUNK]) for i in range(0, len(ids), _EXACT_CHUNK))
        if self.file is None:
            return top_k(queries, k, ((chunk, self.index.reconstruct_batch(chunk)) for chunk in chunks))
        # the fp16 rows scored as they are (see _rerank): numpy's cast alone took 10 ms for the
        # 10,000 rows of a filter's exact path at 10M
        faiss = _faiss()
        faiss.omp_set_num_threads(1 if len(queries) < _PARALLEL_QUERIES else _MAX_THREADS[0])
        scorer = self._fp16_scorer()

        def scored() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for chunk in chunks:
                scores, at = _top16(scorer, self.file.read16(chunk), queries, min(k, len(chunk)))
                yield scores, chunk[at]  # every row found: at most len(chunk) asked for

        return _best_of(len(queries), k, scored())

    def _exact_hnsw(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HNSW's exact path: FAISS scores the rows where its graph keeps them, by their
        positions, on the scan threads. Copying them out first (``reconstruct_batch``, then a
        product) took 65 ms (p50) for a filter passing 83,403 of 1M rows, over the 50 ms a
        filtered query may take; scored in place, 22 ms (benchmarks/scale.py)."""
        faiss = _faiss()
        storage = faiss.downcast_index(faiss.downcast_index(self.index.index).storage)
        rows = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d)
        held, order, by_row = self._held_seqs()
        at, found = _positions(held, ids)
        at = at[found] if order is None else order[at[found]]
        n, k = len(queries), min(k, len(at))
        if not k:
            return np.full((n, 0), -np.inf, dtype=np.float32), np.full((n, 0), -1, dtype=np.int64)
        workers = max(1, min(self._scan_threads, len(at) // _EXACT_CHUNK))

        def score(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            faiss.omp_set_num_threads(1)
            top = min(k, len(part))
            scores = np.empty((n, top), dtype=np.float32)
            positions = np.empty((n, top), dtype=np.int64)  # rows of the graph's storage
            # ld_ids 0: every query scores the same rows
            faiss.knn_inner_products_by_idx(
                faiss.swig_ptr(queries), faiss.swig_ptr(rows), faiss.swig_ptr(part), storage.d, n,
                storage.ntotal, len(part), top, faiss.swig_ptr(scores), faiss.swig_ptr(positions), 0,
            )  # fmt: skip
            return scores, positions

        parts = [np.ascontiguousarray(part) for part in np.array_split(at, workers)]
        scored = [score(parts[0])] if workers == 1 else list(_scan_pool().map(score, parts))
        scores, positions = _best_of_parts(scored, k)
        return _sorted(scores, by_row[positions])

    def _held_seqs(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """HNSW: the seqs it holds, sorted, with the order that sorts its rows (None where they
        were added in seq order, as every write adds them), and each row's seq; kept until the
        index changes (1M seqs: 8 MB, ~2 ms to read)."""
        if self._held is None:
            by_row = _faiss().vector_to_array(self.index.id_map)
            if np.all(by_row[1:] > by_row[:-1]):
                self._held = (by_row, None, by_row)
            else:
                order = np.argsort(by_row, kind="stable")
                self._held = (by_row[order], order, by_row)
        return self._held

    def _fp16_scorer(self) -> Any:
        """A FAISS index that scores fp16 rows as stored, by inner product (F16C)."""
        assert self.file is not None
        faiss = _faiss()
        return faiss.IndexScalarQuantizer(self.file.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of each query's IVF-PQ candidates by exact score from the fp16 vectors
        (a bounded number of queries at a time: each gathers its candidates' rows). FAISS scores
        the fp16 rows as they are (F16C): numpy's cast of 585 rows to float32 took 0.62 ms of a
        query's 0.67 ms of scoring, FAISS takes 0.08 ms."""
        assert self.file is not None
        faiss = _faiss()
        faiss.omp_set_num_threads(1)  # one query at a time: more threads would only spin
        scorer = self._fp16_scorer()
        k = min(k, candidates.shape[1])
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_seqs = np.full((len(queries), k), -1, dtype=np.int64)
        for start in range(0, len(queries), _RERANK_QUERIES):
            cand = candidates[start : start + _RERANK_QUERIES]
            found = cand >= 0
            rows = self.file.read16(cand[found])  # each query's rows in turn
            ends = np.cumsum(found.sum(axis=1))
            for j, (row, held, end) in enumerate(zip(cand, found, ends.tolist(), strict=True)):
                mine = row[held]
                if not len(mine):
                    continue
                top = min(k, len(mine))
                scores, at = _top16(scorer, rows[end - len(mine) : end], queries[start + j : start + j + 1], top)
                out_scores[start + j, :top], out_seqs[start + j, :top] = scores[0], mine[at[0]]
        return _sorted(out_scores, out_seqs)

    def _dead(self) -> tuple[Any, list[Any]]:
        """A FAISS selector for all but the tombstones (or None), and what must outlive the
        search: the parameters hold the selector, and it the bitmap, by pointer."""
        faiss = _faiss()
        if self.state.dead:
            if self._dead_selector is None:
                inner, bits = _bitmap_selector(np.asarray(self.state.dead, dtype=np.int64))
                self._dead_selector = (faiss.IDSelectorNot(inner), inner, bits)
            return self._dead_selector[0], list(self._dead_selector)
        return None, []

    def _search(
        self, queries: np.ndarray, k: int, allowed: Any = None, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """An unfiltered search (``allowed`` None), or, on an exact index, among the ``allowed``
        ids, or on HNSW through the selector ``allowed`` (allowed ids come from the table, so they
        never name a tombstone)."""
        n = len(queries)
        if self.state.live <= 0:
            return np.zeros((n, 0), dtype=np.float32), np.zeros((n, 0), dtype=np.int64)
        k = max(1, min(k, self.state.live))
        if isinstance(self.index, ExactIndex):
            return self.index.search(queries, k, allowed)
        faiss = _faiss()
        params = None
        if self.state.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(ef or self.settings.hnsw_ef(self.state.count), k)
        elif self.state.kind == "ivfpq":
            params = faiss.SearchParametersIVF()
            params.nprobe = self.nprobe
        selector, _keep = (allowed, []) if allowed is not None else self._dead()
        if selector is not None:
            if params is None:
                params = faiss.SearchParameters()
            params.sel = selector
        # FAISS parallelises over queries. For a few queries extra OpenMP threads only cost: they
        # spin after the search and steal the cores the next text embedding needs (a single
        # query went from 10 ms to 19 ms end to end on 2 cores). The setting is per thread.
        faiss.omp_set_num_threads(1 if n < _PARALLEL_QUERIES else _MAX_THREADS[0])
        if self.state.kind == "ivfpq":
            want = min(self.state.live, max(self.rerank, k))
            if n < _PARALLEL_QUERIES and self._scan_threads > 1 and self.scanned >= SPLIT_SCAN_CODES:
                return self._rerank(queries, self._split_scan(queries, want, params.sel), k)
            _, candidates = self.index.search(queries, want, params=params)
            return self._rerank(queries, candidates, k)
        scores, seqs = self.index.search(queries, k, params=params)
        return scores, seqs

    # -- files -------------------------------------------------------------------------------
    def save(self, path: Path, cancel: threading.Event | None = None) -> None:
        """Write the index file (and its state beside it); one of ``SAVE_PIECE`` or more is on
        disk before it replaces the old one (a crash leaves the old file or the new, not an
        empty one in their place). ``cancel`` set meanwhile stops the write (SaveCancelled)
        within one piece; the old file stays. An IVF-PQ index whose fp16 file is mostly removed
        rows rewrites that file first (``compact_file``)."""
        if self.wasteful:
            self.compact_file(cancel)

        def fill(out: _FileWriter) -> None:
            if isinstance(self.index, ExactIndex):
                self.index.save(out)
            else:
                faiss = _faiss()
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(out.write, 1 << 20))

        large = write_file(path, fill, cancel)
        meta = path.with_suffix(".json")
        meta_tmp = meta.with_name(f"{meta.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        meta_tmp.write_text(json.dumps(asdict(self.state)))
        os.replace(meta_tmp, meta)
        if large:
            sync_folder(path.parent)
        self.unsaved = 0
        VectorFile.remove_except(path, self.file.token if self.file is not None else None)
        remove_orphans(path, meta)

    @staticmethod
    def read_state(path: Path) -> IndexState | None:
        """What the index file at ``path`` was built from, without loading it (None: no index)."""
        meta = path.with_suffix(".json")
        try:
            state = IndexState(**json.loads(meta.read_text()))
            size = path.stat().st_size
        except (OSError, ValueError, TypeError):
            return None
        if state.kind == "ivfpq":
            # its vectors are in the fp16 file; the index holds 4-bit codes
            ok = VectorFile.open(path, state.vector_file, state.dim, state.file_rows) is not None
            return state if ok and size >= state.count * state.dim // 8 else None
        # an index file too small to hold its vectors is broken, and will be rebuilt on use
        return state if size >= state.count * state.dim * 4 else None

    @classmethod
    def load(cls, path: Path, settings: IndexSettings) -> VectorIndex | None:
        meta = path.with_suffix(".json")
        for _ in range(3):
            if not path.is_file() or not meta.is_file():
                return None
            try:
                text = meta.read_text()
                state = IndexState(**json.loads(text))
                file, flags = None, 0
                if state.kind == "ivfpq":
                    file = VectorFile.open(path, state.vector_file, state.dim, state.file_rows)
                if state.kind == "flat":
                    index: Any = ExactIndex.read(path, state.dim)
                elif not faiss_installed():
                    return None  # built where FAISS was installed: rebuilt as this install can
                elif state.kind == "hnsw":
                    # memory-mapped: the vectors (2 KB each at 512-d) stay in the page cache,
                    # shared and evictable, not in this process's memory; read in only to grow,
                    # or to keep them in memory (lock_vectors). FAISS before 1.11 has no such
                    # flag: it reads the whole file
                    flags = 0 if settings.lock_vectors else getattr(_faiss(), "IO_FLAG_MMAP_IFC", 0)
                    index = _faiss().read_index(str(path), flags)
                else:
                    index = _faiss().read_index(str(path)) if file is not None else None
                if index is not None and int(index.ntotal) == state.count:
                    loaded = cls(index, state, settings, file)
                    loaded.mapped = path if state.kind == "hnsw" and flags else None
                    return loaded
                # another process may have saved a new build between our reads (and removed the
                # vector file this state names): read it again rather than rebuild it
                if meta.read_text() == text:
                    return None
            except (OSError, ValueError, TypeError, RuntimeError, EOFError):
                return None  # unreadable derived data is simply rebuilt (EOFError: NumPy's, for an empty file)
        return None


def _top16(scorer: Any, rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of fp16 ``rows`` for each query, scored as stored by ``scorer`` (a FAISS
    fp16 scalar quantiser, emptied first): scores and positions in ``rows``."""
    scorer.reset()
    scorer.add_sa_codes(np.ascontiguousarray(rows).view(np.uint8))
    return scorer.search(queries, k)


class _Locking:
    """The lock of a VectorFile's rows (``VectorFile.lock``), on a daemon thread: a process that
    ends does not wait for it."""

    def __init__(self, file: VectorFile):
        self.done = threading.Event()
        self.error: Exception | None = None
        self.first = not file.locked_bytes
        self.seconds, self.bytes = 0.0, 0
        threading.Thread(target=self._run, args=(file,), name="clipsearch-lock-vectors", daemon=True).start()

    def _run(self, file: VectorFile) -> None:
        before = file.locked_bytes
        try:
            self.seconds = file.lock()
            self.bytes = file.locked_bytes - before
        except Exception as e:  # handed to the search that finds it done
            self.error = e
        finally:
            self.done.set()


@dataclass
class _Allowed:
    """What a filtered search derives from an allow-list: FAISS's selector over the bitmap it
    points into, and on IVF-PQ the allowed rows in each list."""

    ids: weakref.ref  # the allow-list itself, while its owner keeps it
    selector: Any
    bits: np.ndarray
    per_list: np.ndarray | None


def _nprobe(state: IndexState, settings: IndexSettings) -> int:
    nlist = state.nlist or 1
    return min(nlist, settings.nprobe or min(MAX_NPROBE, max(16, nlist // 32)))


def _scanned(state: IndexState, settings: IndexSettings) -> int:
    return state.live * _nprobe(state, settings) // max(1, state.nlist)


def _rerank(state: IndexState, settings: IndexSettings) -> int:
    return settings.rerank or max(DEFAULT_RERANK, _scanned(state, settings) // RERANK_SHARE)


def search_effort(state: IndexState, settings: IndexSettings) -> str:
    """What an unfiltered query does on this index, in its own terms (``index status``)."""
    if state.kind == "hnsw":
        return f"efSearch {settings.hnsw_ef(state.count)}"
    if state.kind == "ivfpq":
        return f"{_nprobe(state, settings):,} lists visited, {_rerank(state, settings):,} candidates re-ranked"
    return "exact"


def remove_orphans(*paths: Path) -> None:
    """Remove what a process killed while writing these files left (``<file>.<pid>-<tag>.tmp``;
    at 10M vectors an index's is 1.3 GB): files named by a process that no longer runs."""
    if os.name != "posix":
        return  # elsewhere os.kill(pid, 0) is not a question
    for path in paths:
        name = path.name
        for tmp in path.parent.glob(f"{name}.*.tmp"):
            pid = tmp.name[len(name) + 1 : -len(".tmp")].split("-")[0]
            if not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # alive, another user's


def _bitmap_selector(ids: np.ndarray) -> tuple[Any, np.ndarray]:
    """A FAISS IDSelectorBitmap of ``ids`` and its bitmap (bit ``i & 7`` of byte ``i >> 3`` set for
    each id), which the selector reads by pointer: the caller keeps it alive as long."""
    if len(ids):
        flags = np.zeros(int(ids.max()) + 1, dtype=bool)
        flags[ids] = True
        bits = np.packbits(flags, bitorder="little")
    else:
        bits = np.zeros(1, dtype=np.uint8)
    faiss = _faiss()
    return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits


def _sorted(scores: np.ndarray, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best score first; equal scores (a photo stored twice) by seq, so that every run and every
    index kind ranks them alike."""
    order = np.lexsort((seqs, -scores), axis=-1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(seqs, order, axis=1)
