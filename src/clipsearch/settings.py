"""Settings: every ``CLIPSEARCH_*`` variable the library reads, typed, in one object, and the
default paths derived from them.

The command line reads the variables of its own options through Typer (``--db`` and
``CLIPSEARCH_DB`` are one setting, shown in ``--help``); everything below the command line
reads them here. The environment is read once where a caller enters the library
(``clipsearch.open``, ``open_store``, the server's start) and the ``Settings`` passed down from
there: the collection gives the store its index and pool settings and ingest its download cache.
Two process-wide switches are read where they act, as ``HF_HUB_CACHE`` is by the hub: the ONNX
export cache (``CLIPSEARCH_ONNX_CACHE``, shared by every model loader and ``models export``) and
``CLIPSEARCH_ONEDNN``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import UsageError

PREFIX = "CLIPSEARCH_"
DEFAULT_DB = "clipsearch.db"  # the database commands use when --db and CLIPSEARCH_DB say none


def is_postgres_url(location: str) -> bool:
    """Whether a ``--db`` names a PostgreSQL server (else a SQLite file): decided here only."""
    return str(location).startswith(("postgresql://", "postgres://"))


def is_server(location: str) -> bool:
    """A database behind a URL (nothing on this machine's disk to look for)."""
    return "://" in str(location)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``6G``, ``6GB``, ``6GiB``, ``512M``, ``1.5g`` or a number of bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise UsageError(f"{text!r} is not a size; write it like 6G, 512M or 2.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _flag(value: str) -> bool:
    return value.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Settings:
    db: str = DEFAULT_DB  # CLIPSEARCH_DB: a SQLite file or a postgresql:// URL
    namespace: str = "default"  # CLIPSEARCH_NAMESPACE
    onnx_cache: Path = Path("~/.cache/clipsearch/onnx")  # CLIPSEARCH_ONNX_CACHE: exported towers
    onednn: bool = True  # CLIPSEARCH_ONEDNN=0: keep PyTorch's own CPU matrix products
    max_text_batch: int = 16  # CLIPSEARCH_MAX_TEXT_BATCH: texts per model call in the server
    pg_pool: int = 8  # CLIPSEARCH_PG_POOL: PostgreSQL connections per process
    pg_build_workers: int = 0  # CLIPSEARCH_PG_BUILD_WORKERS: parallel workers of an HNSW build; 0: the server's
    pg_exact_filter_rows: int = 10_000  # CLIPSEARCH_PG_EXACT_FILTER_ROWS: filters with fewer rows are exact
    index: str = "auto"  # CLIPSEARCH_INDEX: auto | flat | hnsw | ivfpq
    # CLIPSEARCH_INDEX_MEMORY: what an index may hold in memory (6G, 512M); auto picks IVF-PQ for a
    # namespace whose HNSW index would need more. Empty: a quarter of this machine's memory.
    index_memory: str = ""
    hnsw_threshold: int = 50_000  # CLIPSEARCH_HNSW_THRESHOLD: vectors from which auto picks HNSW
    hnsw_m: int = 32  # CLIPSEARCH_HNSW_M
    ef_construction: int = 128  # CLIPSEARCH_EF_CONSTRUCTION
    ef_search: int = 0  # CLIPSEARCH_EF_SEARCH: HNSW search effort; 0: by the index's size (128 on PostgreSQL)
    ivf_nprobe: int = 0  # CLIPSEARCH_IVF_NPROBE: IVF lists a query visits (0: 1/32 of them, 16 to 384)
    ivf_rerank: int = 0  # CLIPSEARCH_IVF_RERANK: IVF-PQ candidates re-scored from the fp16 vectors; 0: by size
    # CLIPSEARCH_SEARCH_THREADS: threads one query's IVF-PQ scan may use (0: FAISS's, the cores);
    # 1 leaves the other cores to other clients' queries
    search_threads: int = 0
    # CLIPSEARCH_LOCK_VECTORS: a serving process keeps its index's vectors in memory: IVF-PQ's fp16
    # file locked there (mlock), HNSW read in rather than memory-mapped, so that no query waits on
    # the disk for them (a kernel may page out file pages it sees idle; this machine's did after a minute)
    lock_vectors: bool = False
    query_runtime: str = "auto"  # CLIPSEARCH_QUERY_RUNTIME: auto | torch (see Collection)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            default = f.default
            try:
                if isinstance(default, bool):
                    values[f.name] = _flag(raw)
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, Path):
                    values[f.name] = Path(raw)
                else:
                    values[f.name] = raw.strip()
            except ValueError:
                raise UsageError(f"{PREFIX}{f.name.upper()}={raw!r} is not a valid {type(default).__name__}") from None
        if "onnx_cache" not in values and env.get("XDG_CACHE_HOME"):
            values["onnx_cache"] = Path(env["XDG_CACHE_HOME"]) / "clipsearch" / "onnx"
        settings = cls(**values)  # type: ignore[arg-type]
        if settings.index_memory:
            try:
                parse_size(settings.index_memory)
            except UsageError:
                raise UsageError(
                    f"{PREFIX}INDEX_MEMORY={settings.index_memory!r} is not a size; write it like 6G or 512M"
                ) from None
        if settings.query_runtime not in ("auto", "torch"):
            raise UsageError(f"{PREFIX}QUERY_RUNTIME={settings.query_runtime!r}: use auto or torch")
        return settings

    def __post_init__(self) -> None:
        object.__setattr__(self, "onnx_cache", Path(os.path.expanduser(self.onnx_cache)))

    # -- default paths -------------------------------------------------------------------
    @staticmethod
    def user_cache() -> Path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return Path(base) / "clipsearch"

    @staticmethod
    def user_db() -> Path:
        """The per-user database of ``search --in``: ``$XDG_DATA_HOME/clipsearch/clipsearch.db``."""
        base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
        return Path(base) / "clipsearch" / DEFAULT_DB

    def download_cache(self, db: str) -> Path:
        """Downloads live beside a SQLite database; a server database gets a per-user cache."""
        if is_server(db):
            return self.user_cache() / "downloads"
        # absolute: the paths of downloaded images are stored, and read from any folder later
        return Path(os.path.abspath(db + "-cache"))

    def media_root(self, db: str) -> Path:
        """The server's uploads and thumbnails: beside a SQLite database, else per user."""
        if is_server(db):
            return self.user_cache() / "media"
        return Path(os.path.abspath(db + "-media"))


def settings() -> Settings:
    """The settings as the environment says now."""
    return Settings.from_env()
