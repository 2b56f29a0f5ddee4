"""Downloads for catalog ingest: a content-addressed cache of fetched images, and a downloader
that fetches many URLs at once on its own thread, ahead of decoding.

Cache layout (``--cache-dir``, default beside the database)::

    objects/<sha256[:2]>/<sha256>   the bytes a URL answered, named by their digest
    index.db                        SQLite: url -> sha256, size, fetch time

A URL in the index is never fetched again; two URLs that answer the same bytes share one file.
A URL that failed is remembered too (``failed``), for ``FAILURE_MEMORY`` seconds: a catalog
ingested into a second namespace of the same store, or by a worker, does not wait for the same
dead or hanging URL again; ``--retry-failed`` fetches it anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import queue
import random
import sqlite3
import tempfile
import threading
import time
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
# The catalog is the user's own file: private hosts are allowed (the server's API is not). The
# timeout is the deadline of a URL, every attempt, redirect and back-off included: a hanging
# host costs it once, not once per attempt (a CDN answers an image in well under a second).
CATALOG_POLICY = FetchPolicy(allow_private=True, timeout=20.0, max_bytes=50 * 1024 * 1024)
# how long a failed URL is not fetched again (seconds): a failure that no retry can mend (HTTP
# 404, not an image, too large) for a day; one that gave up on a timeout, a broken connection,
# 5xx or 429 for an hour
FAILURE_MEMORY = {True: 24 * 3600.0, False: 3600.0}  # permanent? -> seconds

_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    url TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    fetched_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS failed (
    url TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    permanent INTEGER NOT NULL,
    failed_at REAL NOT NULL
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

    def remember_failure(self, url: str, reason: str, permanent: bool) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO failed (url, reason, permanent, failed_at) VALUES (?, ?, ?, ?)",
                (url, reason, int(permanent), time.time()),
            )

    def recent_failure(self, url: str) -> str | None:
        """Why ``url`` failed, if it did within ``FAILURE_MEMORY``; None otherwise."""
        with self._lock:
            row = self._conn.execute("SELECT reason, permanent, failed_at FROM failed WHERE url = ?", (url,)).fetchone()
        if row is None or time.time() - row[2] > FAILURE_MEMORY[bool(row[1])]:
            return None
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row[2]))
        # a stored reason, so it names no flag: each face words those for its own users
        return f"{row[0]} (failed at {when}; not fetched again for a while unless failures are retried)"

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
    they finish, so one slow URL holds up nothing but itself. A URL submitted again while it is
    in flight is fetched once, and its result given to each key. A URL that failed recently
    (``DownloadCache.recent_failure``) is not fetched again unless ``retry_failed``."""

    def __init__(self, cache: DownloadCache, settings: DownloadSettings | None = None, retry_failed: bool = False):
        self.cache = cache
        self.settings = settings or DownloadSettings()
        self.retry_failed = retry_failed
        self._results: queue.SimpleQueue[Downloaded] = queue.SimpleQueue()
        self._waiting: dict[str, list[Any]] = {}  # url in flight -> the keys that wait for it
        self._waiting_lock = threading.Lock()
        self._futures: set[Future] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="clipsearch-download", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    async def _open(self) -> httpx.AsyncClient:
        self._slots = asyncio.Semaphore(max(1, self.settings.concurrency))
        limits = httpx.Limits(max_connections=self.settings.concurrency, max_keepalive_connections=None)
        # a connection that stalls for half the deadline fails its attempt, leaving time to retry
        idle = httpx.Timeout(max(1.0, self.settings.policy.timeout / 2))
        return httpx.AsyncClient(limits=limits, timeout=idle, trust_env=False)

    def submit(self, key: Any, url: str) -> None:
        with self._waiting_lock:
            if url in self._waiting:
                self._waiting[url].append(key)
                return
            self._waiting[url] = [key]
        future = asyncio.run_coroutine_threadsafe(self._download(url), self._loop)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def get(self, timeout: float | None = None) -> Downloaded:
        return self._results.get(timeout=timeout)

    def ready(self) -> bool:
        return not self._results.empty()

    def _finish(self, url: str, path: Path | None, error: str | None) -> None:
        with self._waiting_lock:
            keys = self._waiting.pop(url, [])
        for key in keys:
            self._results.put(Downloaded(key, path, error))

    async def _download(self, url: str) -> None:
        try:
            if not self.retry_failed:
                remembered = await asyncio.to_thread(self.cache.recent_failure, url)
                if remembered is not None:
                    self._finish(url, None, remembered)
                    return
            try:
                data = await self._fetch(url)
            except ClipsearchError as e:  # a FetchError, or too large, or a forbidden URL
                permanent = not getattr(e, "retryable", False)
                await asyncio.to_thread(self.cache.remember_failure, url, e.message, permanent)
                self._finish(url, None, e.message)
                return
            path = await asyncio.to_thread(self.cache.put, url, data)
            self._finish(url, path, None)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one bad URL must never stop the run
            self._finish(url, None, f"unexpected {type(e).__name__}: {e}")

    async def _fetch(self, url: str) -> bytes:
        """The bytes of ``url``, with retries (and back-off between them) while its deadline,
        ``policy.timeout`` from the start of its first attempt, allows; else the last
        FetchError. Waiting for a free connection before that start does not count."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        for attempt in range(settings.retries + 1):
            try:
                async with self._slots:
                    if deadline is None:
                        deadline = loop.time() + settings.policy.timeout
                    left = deadline - loop.time()
                    if left <= 0:
                        raise FetchError(f"{url[:200]}: timed out before a retry could start", True)
                    return await fetch_url(self._client, url, dataclasses.replace(settings.policy, timeout=left))
            except FetchError as e:
                assert deadline is not None
                # back off outside the semaphore, so a struggling host does not idle the slots
                pause = settings.backoff * 2**attempt * (0.5 + random.random())
                if not e.retryable or attempt == settings.retries or loop.time() + pause >= deadline:
                    if not attempt:
                        raise
                    spent = settings.policy.timeout - max(0.0, deadline - loop.time())
                    tries = f" (gave up after {attempt + 1} attempts in {spent:.0f} s)"
                    raise FetchError(e.message + tries, e.retryable) from None
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

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
    cache: DownloadCache,
    urls: Iterable[str],
    settings: DownloadSettings | None = None,
    offline: bool = False,
    retry_failed: bool = False,
) -> list[Downloaded]:
    """Each URL's file, in input order (``key`` is its position): from the cache, else downloaded
    (concurrently, each URL once) unless ``offline``, which answers ``NOT_CACHED`` instead."""
    urls = list(urls)
    out: list[Downloaded] = []
    missing: list[int] = []
    for i, url in enumerate(urls):
        cached = cache.lookup(url)
        out.append(Downloaded(i, cached, None if cached is not None or not offline else NOT_CACHED))
        if cached is None and not offline:
            missing.append(i)
    if missing:  # the downloader's thread and loop only when something is to be fetched
        with Downloader(cache, settings, retry_failed) as downloader:
            for i in missing:
                downloader.submit(i, urls[i])
            for _ in missing:
                result = downloader.get()
                out[result.key] = result
    return out
