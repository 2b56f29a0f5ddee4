"""Downloads for catalog ingest: a content-addressed cache of fetched images, and a downloader
that fetches many URLs at once on its own thread, ahead of decoding.

Cache layout (``--cache-dir``, default beside the database)::

    objects/<sha256[:2]>/<sha256>   the bytes a URL answered, named by their digest
    index.db                        SQLite: url -> sha256, size, fetch time

A URL in the index is never fetched again; two URLs that answer the same bytes share one file.
Only successful fetches are cached: a failure is the store's to record, with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import random
import sqlite3
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .errors import ClipsearchError, FetchError, UsageError, option
from .fetch import FetchPolicy, fetch_url
from .store.base import utcnow

DEFAULT_CONCURRENCY = 16
# the failure reason of a URL that an --offline run found no cached copy of; a later run that
# may download retries it without --retry-failed
NOT_CACHED = "not cached (the run was --offline)"
DEFAULT_RETRIES = 3
# the catalog is the user's own file: private hosts are allowed (the server's API is not)
CATALOG_POLICY = FetchPolicy(allow_private=True, timeout=30.0, max_bytes=50 * 1024 * 1024)

_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    url TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    fetched_at TEXT NOT NULL
);
"""


class DownloadCache:
    """URL -> file, content-addressed. Safe to share between threads and between processes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            (self.root / "objects").mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.root / "index.db", check_same_thread=False, isolation_level=None, timeout=30
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_INDEX_SCHEMA)
        except (OSError, sqlite3.DatabaseError) as e:
            raise UsageError(
                f"cannot use {self.root} as the download cache ({e}); pass another {option('cache_dir')}"
            ) from None
        self._lock = threading.Lock()

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def lookup(self, url: str) -> Path | None:
        """The cached file for ``url``, or None (never fetched, or its file was removed)."""
        with self._lock:
            row = self._conn.execute("SELECT sha256 FROM urls WHERE url = ?", (url,)).fetchone()
        if row is None:
            return None
        path = self.object_path(row[0])
        return path if path.is_file() else None

    def put(self, url: str, data: bytes) -> Path:
        digest = hashlib.sha256(data).hexdigest()
        path = self.object_path(digest)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)  # a reader never sees half a file
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO urls (url, sha256, size, fetched_at) VALUES (?, ?, ?, ?)",
                (url, digest, len(data), utcnow()),
            )
        return path

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM urls").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass(frozen=True)
class DownloadSettings:
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = DEFAULT_RETRIES  # extra attempts after a timeout, a broken connection, 5xx or 429
    backoff: float = 0.5  # seconds before the first retry; doubles each time, with jitter
    policy: FetchPolicy = CATALOG_POLICY


@dataclass
class Downloaded:
    key: Any  # what the caller submitted the URL with
    path: Path | None
    error: str | None


class Downloader:
    """Fetches URLs concurrently (httpx on an asyncio loop in a background thread) into a
    ``DownloadCache``. ``submit`` never blocks; results come back from ``get`` in the order
    they finish, so one slow URL holds up nothing but itself."""

    def __init__(self, cache: DownloadCache, settings: DownloadSettings | None = None):
        self.cache = cache
        self.settings = settings or DownloadSettings()
        self._results: queue.SimpleQueue[Downloaded] = queue.SimpleQueue()
        self._futures: set[Future] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="clipsearch-download", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    async def _open(self) -> httpx.AsyncClient:
        self._slots = asyncio.Semaphore(max(1, self.settings.concurrency))
        limits = httpx.Limits(max_connections=self.settings.concurrency, max_keepalive_connections=None)
        return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.settings.policy.timeout), trust_env=False)

    def submit(self, key: Any, url: str) -> None:
        future = asyncio.run_coroutine_threadsafe(self._download(key, url), self._loop)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def get(self, timeout: float | None = None) -> Downloaded:
        return self._results.get(timeout=timeout)

    def ready(self) -> bool:
        return not self._results.empty()

    async def _download(self, key: Any, url: str) -> None:
        settings = self.settings
        try:
            for attempt in range(settings.retries + 1):
                try:
                    async with self._slots:
                        data = await fetch_url(self._client, url, settings.policy)
                except FetchError as e:
                    if not e.retryable or attempt == settings.retries:
                        tries = f" (after {attempt + 1} attempts)" if attempt else ""
                        self._results.put(Downloaded(key, None, e.message + tries))
                        return
                    # back off outside the semaphore, so a struggling host does not idle the slots
                    await asyncio.sleep(settings.backoff * 2**attempt * (0.5 + random.random()))
                    continue
                path = await asyncio.to_thread(self.cache.put, url, data)
                self._results.put(Downloaded(key, path, None))
                return
        except asyncio.CancelledError:
            raise
        except ClipsearchError as e:
            self._results.put(Downloaded(key, None, e.message))
        except Exception as e:  # one bad URL must never stop the run
            self._results.put(Downloaded(key, None, f"unexpected {type(e).__name__}: {e}"))

    def close(self) -> None:
        """Cancel what is still downloading and stop the thread."""
        for future in list(self._futures):
            future.cancel()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def download_all(
    cache: DownloadCache, urls: Iterable[str], settings: DownloadSettings | None = None, offline: bool = False
) -> list[Downloaded]:
    """Each URL's file, in input order (``key`` is its position): from the cache, else downloaded
    (concurrently) unless ``offline``, which answers ``NOT_CACHED`` instead."""
    urls = list(urls)
    out: list[Downloaded] = []
    missing: list[int] = []
    for i, url in enumerate(urls):
        cached = cache.lookup(url)
        out.append(Downloaded(i, cached, None if cached is not None or not offline else NOT_CACHED))
        if cached is None and not offline:
            missing.append(i)
    if missing:  # the downloader's thread and loop only when something is to be fetched
        with Downloader(cache, settings) as downloader:
            for i in missing:
                downloader.submit(i, urls[i])
            for _ in missing:
                result = downloader.get()
                out[result.key] = result
    return out
