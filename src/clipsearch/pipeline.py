"""The ingest pipeline: source items -> selection (filters, sample) -> skip check -> download
(URLs, ``downloads``) -> read + hash + decode + crop (worker threads or processes, ``decoding``)
-> batched normalise + encode -> one store transaction per batch.

Every stage overlaps the next. Downloads run on their own thread, many at once, and come back
in the order they finish, so the model never waits for the slowest URL. Decoding keeps a
bounded window of items in the workers while the model runs on the previous batch. On a CPU the
decode workers are threads (the decoders release the GIL, and the model needs the cores more
than a second interpreter does); with a GPU they are processes, since decoding is then the
bottleneck and must scale past one interpreter.

Properties it guarantees:
- resumable: every batch commits its vectors and failures together, so a crash or Ctrl-C loses
  at most the batch in flight, and the next run skips everything already stored;
- shareable: items are claimed in the store before they are decoded, so several processes
  ingesting the same source into one namespace split the work (a dead process's claims are
  taken over: at once on the same host, after the lease elsewhere);
- incremental: an item whose fingerprint (what its source says about it) and, for files, size
  and mtime match the store is skipped unread; one whose content hash matches is not embedded
  again (only its metadata is refreshed); a changed file is embedded again under the same id;
- robust: any failure to read or decode becomes a recorded failure with its reason.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .decoding import DecodeSettings, Unchanged, decode_item, failure_reason
from .downloads import NOT_CACHED, DownloadCache, Downloader, DownloadSettings
from .errors import UsageError
from .identity import ModelSpec
from .imaging import DEFAULT_MAX_MEGAPIXELS
from .sources import Source, SourceItem, filter_items, sample_items
from .store import DEFAULT_NAMESPACE, FailureRecord, FileState, NewItem, Store, claim_owner
from .store.base import with_derived

if TYPE_CHECKING:
    from .encoders import Encoder

_LOOKUP_CHUNK = 512
# Waiting this long for a download with a part-filled batch in hand, the batch is embedded and
# committed: one slow URL never keeps the rest of a batch uncommitted (nor out of a Ctrl-C'd run).
IDLE_FLUSH_SECONDS = 1.0
_MAX_PENDING_FAILURES = 256  # written without waiting for a batch of images


@dataclass
class IngestOptions:
    namespace: str = DEFAULT_NAMESPACE
    batch_size: int = 32
    limit: int | None = None
    workers: int | None = None  # decode workers; default: see default_workers()
    worker_type: str = "auto"  # auto | thread | process
    retry_failed: bool = False
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    filters: dict[str, list[str]] | None = None  # only items whose metadata matches
    sample: int | None = None  # a reproducible random subset of this many items
    seed: int = 0
    embed_text: bool = False  # also store the text tower's vector of each item's text
    offline: bool = False  # URLs only from the download cache
    cache_dir: Path | None = None  # download cache; default: beside the database
    download: DownloadSettings = field(default_factory=DownloadSettings)


@dataclass
class IngestReport:
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    previously_failed: int = 0  # skipped because they failed before and --retry-failed was not given
    claimed_elsewhere: int = 0  # left to another ingest process working on the same namespace
    repeated_ids: int = 0  # items whose id an earlier item (e.g. catalog row) already had: not ingested
    removed: int = 0  # --prune: items whose file is gone, deleted
    moved: int = 0  # --prune: items whose file was renamed or moved, kept with their vector
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[FailureRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "embedded": self.embedded,
            "skipped": self.skipped,
            "failed": self.failed,
            "previously_failed": self.previously_failed,
            "claimed_elsewhere": self.claimed_elsewhere,
            "repeated_ids": self.repeated_ids,
            "removed": self.removed,
            "moved": self.moved,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "failures": [{"id": f.id, "source": f.source, "reason": f.reason} for f in self.failures],
        }


@dataclass
class _Prepared:
    item: NewItem
    crop: np.ndarray


@dataclass
class _Ready:
    """An item whose bytes are at hand (a file, or a downloaded URL), or why they are not."""

    item: SourceItem
    known: FileState | None
    error: str | None = None


@dataclass
class _InFlight:
    item: SourceItem
    known: FileState | None
    future: Future


ProgressCallback = Callable[[int, int], None]  # (items done, items total)


def default_workers(worker_type: str = "thread") -> int:
    """Threads: one per core, at most 4 (the model uses the cores too). Processes (GPU): every
    core but one, which feeds the GPU."""
    cores = os.cpu_count() or 1
    if worker_type == "process":
        return max(1, cores - 1)
    return max(1, min(4, cores))


def resolve_worker_type(requested: str, device: str) -> str:
    if requested not in ("auto", "thread", "process"):
        raise UsageError(f"unknown --worker-type {requested!r}; use auto, thread or process")
    if requested != "auto":
        return requested
    return "thread" if device == "cpu" else "process"


class Ingestor:
    def __init__(self, store: Store, encoder: Encoder, model_spec: ModelSpec, options: IngestOptions):
        self.store = store
        self.encoder = encoder
        self.options = options
        self.namespace = options.namespace
        device = str(getattr(encoder, "device", "cpu")).split(":")[0]
        self.worker_type = resolve_worker_type(options.worker_type, device)
        self.workers = options.workers or default_workers(self.worker_type)
        self.settings = DecodeSettings.for_encoder(encoder, options.max_megapixels)
        self.owner = claim_owner()
        store.bind_namespace(self.namespace, encoder.identity, model_spec.to_dict())

    def _executor(self) -> Executor:
        if self.worker_type == "process":
            # spawn: a fresh interpreter that imports only the decode stage, never a fork of a
            # process holding a model and thread pools
            context = multiprocessing.get_context("spawn")
            return ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="clipsearch-decode")

    def run(
        self,
        sources: Iterable[Source],
        progress: ProgressCallback | None = None,
        selected: tuple[list[SourceItem], int] | None = None,
    ) -> IngestReport:
        """Ingest ``sources``; ``selected``: their items and repeated ids, as ``select`` found
        them (the caller listed them already)."""
        started = time.perf_counter()
        report = IngestReport()
        options = self.options
        if selected is None:
            items = self.select(sources, report)
        else:
            items, report.repeated_ids = selected
        total = len(items)
        advance = progress_counter(total, progress)
        pending_failures: list[FailureRecord] = []
        pending_touched: list[NewItem] = []
        batch: list[_Prepared] = []
        limit = options.limit
        queued = 0  # items in flight or embedded: they count against --limit

        def flush() -> None:
            if not batch and not pending_failures and not pending_touched:
                return
            if batch:
                vectors = self.encoder.embed_crops(np.stack([p.crop for p in batch]))
            else:
                vectors = np.zeros((0, self.encoder.dim), np.float32)
            new_items = [p.item for p in batch]
            if options.embed_text:
                self._embed_texts([*new_items, *pending_touched])
            self.store.write_batch(self.namespace, new_items, vectors, pending_failures, pending_touched)
            report.embedded += len(batch)
            report.failed += len(pending_failures)
            report.failures.extend(pending_failures)
            advance(len(batch) + len(pending_failures) + len(pending_touched))
            batch.clear()
            pending_failures.clear()
            pending_touched.clear()

        def fail(item: SourceItem, reason: str) -> None:
            nonlocal queued
            pending_failures.append(failure_record(item, reason))
            queued -= 1  # failed: it does not use up the limit
            if len(pending_failures) >= _MAX_PENDING_FAILURES:
                flush()

        window = max(2 * options.batch_size, 4 * self.workers)
        executor = self._executor()
        in_flight: deque[_InFlight] = deque()

        def submit(entry: _InFlight) -> None:
            known_sha = entry.known.sha256 if entry.known else None
            entry.future = executor.submit(decode_item, entry.item, known_sha, self.settings)

        def file_result(entry: _InFlight) -> None:
            """Put one finished item where it belongs: the batch, the failures or the touched."""
            nonlocal queued
            item = entry.item
            try:
                result = entry.future.result()
            except Exception as e:  # one bad file must never stop the run
                fail(item, failure_reason(e))
                return
            if isinstance(result, Unchanged):
                # same bytes as stored: keep the vector, refresh what the source says
                pending_touched.append(item_row(item, result.sha256, result.size))
                report.skipped += 1
                queued -= 1  # unchanged: it does not use up the limit
                return
            row = item_row(item, result.sha256, result.size, namespace=self.namespace, size_wh=result)
            batch.append(_Prepared(row, result.crop))
            if len(batch) >= options.batch_size:
                flush()

        def collect() -> None:
            nonlocal executor
            entry = in_flight.popleft()
            # exception() waits for the item; Ctrl-C while waiting goes through
            if not isinstance(entry.future.exception(), BrokenProcessPool):
                file_result(entry)
                return
            # A decoder process died (a crash in a native decoder on some file), and every item
            # in flight with it. Decode those again one at a time in fresh processes, so that the
            # file that kills a process again is the one recorded as failed.
            suspects = [entry, *in_flight]
            in_flight.clear()
            executor.shutdown(wait=False, cancel_futures=True)
            executor = self._executor()
            for suspect in suspects:
                submit(suspect)
                if isinstance(suspect.future.exception(), BrokenProcessPool):
                    executor.shutdown(wait=False, cancel_futures=True)
                    executor = self._executor()
                file_result(suspect)

        ready = self._ready(self.candidates(items, report, advance))
        try:
            for entry in ready:
                if entry is None:  # the network keeps us waiting: embed and commit what is here
                    while in_flight:
                        collect()
                    flush()
                    continue
                if limit is not None and queued >= limit:
                    break
                queued += 1
                if entry.error is not None:
                    fail(entry.item, entry.error)
                    continue
                flight = _InFlight(entry.item, entry.known, Future())
                submit(flight)
                in_flight.append(flight)
                while len(in_flight) >= window or (limit is not None and queued >= limit and in_flight):
                    collect()
                if limit is not None and queued >= limit:
                    break
            while in_flight:
                collect()
            flush()
        except KeyboardInterrupt:
            report.interrupted = True
            for flight in in_flight:
                flight.future.cancel()
        finally:
            ready.close()  # stops the downloads still running
            executor.shutdown(wait=not report.interrupted, cancel_futures=True)
            self.store.release(self.namespace, self.owner)
        if report.embedded and not report.interrupted:
            self.store.build_index(self.namespace)
        report.seconds = time.perf_counter() - started
        if progress and not report.interrupted:
            progress(total, total)
        return report

    # -- stages ------------------------------------------------------------------------
    def select(self, sources: Iterable[Source], report: IngestReport) -> list[SourceItem]:
        """The items to consider: each id once, then --filter and --sample."""
        options = self.options
        return select(sources, options, report)

    def _embed_texts(self, items: list[NewItem]) -> None:
        with_text = [it for it in items if it.text]
        if with_text:
            vectors = self.encoder.embed_texts([it.text or "" for it in with_text])
            for it, vector in zip(with_text, vectors, strict=True):
                it.text_vector = vector

    def candidates(
        self, items: list[SourceItem], report: IngestReport, advance: Callable[[int], None]
    ) -> Iterator[tuple[SourceItem, FileState | None]]:
        """The items that need work, looked up in the store a chunk at a time, and claimed a
        batch at a time just before they are needed: another ingest process working on the
        same items takes the batches this one has not reached yet."""
        step = self.options.batch_size
        for start in range(0, len(items), _LOOKUP_CHUNK):
            todo = self._filter_known(items[start : start + _LOOKUP_CHUNK], report, advance)
            for first in range(0, len(todo), step):
                part = todo[first : first + step]
                claimed = self.store.claim(self.namespace, [item.id for item, _ in part], self.owner)
                if len(claimed) < len(part):
                    report.claimed_elsewhere += len(part) - len(claimed)
                    advance(len(part) - len(claimed))
                # looked up again: another process may have stored (and released) some meanwhile
                yield from self._filter_known([item for item, _ in part if item.id in claimed], report, advance)

    def _filter_known(
        self, chunk: list[SourceItem], report: IngestReport, advance: Callable[[int], None]
    ) -> list[tuple[SourceItem, FileState | None]]:
        return filter_known(self.store, self.namespace, chunk, report, advance, self.options)

    def _ready(self, candidates: Iterator[tuple[SourceItem, FileState | None]]) -> Iterator[_Ready | None]:
        """Items with their bytes at hand. Files and cached URLs pass straight through; other
        URLs are downloaded (many at once) and come out as they finish. ``None`` says that no
        download has finished for ``IDLE_FLUSH_SECONDS``: a slow URL must not hold back the
        items that are ready."""
        cache: DownloadCache | None = None
        downloader: Downloader | None = None
        outstanding = 0
        settings = self.options.download
        # Downloads must go on while the model runs a batch (about a second on a CPU), and a
        # finished download counts until it is consumed: a deep window keeps the network busy.
        # A finished one is only a path on disk, so depth is cheap.
        window = 16 * max(1, settings.concurrency)
        if self.options.limit is not None:  # with --limit N, never download far ahead of N
            window = max(1, min(window, self.options.limit))

        def finished(block: bool) -> Iterator[_Ready | None]:
            nonlocal outstanding
            assert downloader is not None
            while outstanding and (block or downloader.ready()):
                try:
                    result = downloader.get(timeout=IDLE_FLUSH_SECONDS if block else None)
                except queue.Empty:
                    yield None  # still waiting for the network: time to commit what has arrived
                    continue
                outstanding -= 1
                item, known = result.key
                if result.path is not None:
                    item.downloaded_to(result.path)
                yield _Ready(item, known, result.error)
                block = False

        try:
            for item, known in candidates:
                if item.error is not None:
                    yield _Ready(item, known, item.error)
                    continue
                if item.url is None:
                    yield _Ready(item, known)
                    continue
                if cache is None:
                    cache = DownloadCache(self._cache_dir())
                cached = cache.lookup(item.url)
                if cached is not None:
                    item.downloaded_to(cached)
                    yield _Ready(item, known)
                elif self.options.offline:
                    yield _Ready(item, known, NOT_CACHED)
                else:
                    if downloader is None:
                        downloader = Downloader(cache, settings)
                    downloader.submit((item, known), item.url)
                    outstanding += 1
                if downloader is not None:
                    yield from finished(block=outstanding >= window)
            if downloader is not None:
                while outstanding:
                    yield from finished(block=True)
        finally:
            if downloader is not None:
                downloader.close()
            if cache is not None:
                cache.close()

    def _cache_dir(self) -> Path:
        if self.options.cache_dir is not None:
            return Path(self.options.cache_dir).expanduser().absolute()  # stored paths are read from anywhere
        return default_cache_dir(self.store.location)


def filter_known(
    store: Store,
    namespace: str,
    chunk: list[SourceItem],
    report: IngestReport,
    advance: Callable[[int], None],
    options: IngestOptions,
) -> list[tuple[SourceItem, FileState | None]]:
    """Drop items that are stored and unchanged, or failed before in the same state (counted in
    ``report``); the rest, with what the store knows of each."""
    ids = [it.id for it in chunk]
    stored = store.file_states(namespace, ids)
    failed = {} if options.retry_failed else store.failure_states(namespace, ids)
    todo = []
    for item in chunk:
        known = stored.get(item.id)
        if known is not None and _unchanged(known, item):
            report.skipped += 1
            advance(1)
            continue
        prior = failed.get(item.id)
        if prior is not None and _unchanged(prior, item) and not (prior.reason == NOT_CACHED and not options.offline):
            report.previously_failed += 1
            advance(1)
            continue
        todo.append((item, known))
    return todo


def select(sources: Iterable[Source], options: IngestOptions, report: IngestReport) -> list[SourceItem]:
    """The items to consider: those that pass ``--filter``, each id once, then ``--sample``."""
    listed = filter_items([it for source in sources for it in source], options.filters)
    # ids repeat among the selected items only: a row the filter leaves out repeats nothing
    return sample_items(unique_items([listed], report), options.sample, options.seed)


def nothing_to_do(store: Store, namespace: str, items: list[SourceItem], options: IngestOptions) -> IngestReport | None:
    """The report of a run in which every item is stored or failed before, unchanged; None if
    any item needs work. Needs no model: a re-run with nothing new loads none (and starts no
    Ray cluster)."""
    report = IngestReport()
    for start in range(0, len(items), _LOOKUP_CHUNK):
        if filter_known(store, namespace, items[start : start + _LOOKUP_CHUNK], report, lambda n=1: None, options):
            return None
    return report


def progress_counter(total: int, progress: ProgressCallback | None) -> Callable[..., None]:
    """``advance(n=1)``: n more of ``total`` items are done, told to ``progress`` (which hears
    (0, total) at once)."""
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    if progress:
        progress(0, total)
    return advance


def unique_items(sources: Iterable[Source], report: IngestReport) -> list[SourceItem]:
    """Every item of the sources once, in order: of items with equal ids (a catalog that lists a
    product twice, a folder given twice) the first, the others counted as ``repeated_ids``."""
    seen: set[str] = set()
    out = []
    for source in sources:
        for item in source:
            if item.id in seen:
                report.repeated_ids += 1
                continue
            seen.add(item.id)
            out.append(item)
    return out


def default_cache_dir(db: str) -> Path:
    """Downloads live beside a SQLite database; a server database gets a per-user cache."""
    from .settings import settings

    return settings().download_cache(db)


def _unchanged(state: FileState, item: SourceItem) -> bool:
    """Whether a stored (or failed) item is the same as the source's: the same fingerprint, and
    for a file also the same size and mtime. Rows written before fingerprints existed compare by
    size and mtime alone."""
    if item.fingerprint is not None and state.fingerprint is not None and item.fingerprint != state.fingerprint:
        return False
    if item.url is not None or item.error is not None:
        return state.fingerprint is not None and state.fingerprint == item.fingerprint
    return (
        state.size is not None
        and state.mtime_ns is not None
        and state.size == item.size
        and state.mtime_ns == item.mtime_ns
    )


def item_row(
    item: SourceItem,
    sha256: str,
    size: int,
    *,
    namespace: str | None = None,
    size_wh: Any = None,
    text_vector: np.ndarray | None = None,
) -> NewItem:
    """The store row of a source item. For a newly decoded image give ``namespace`` and
    ``size_wh`` (anything with the original's ``width`` and ``height``): its metadata gains what
    decoding found. Without them (the bytes are unchanged) the row carries only what the source
    says, and the store keeps the derived keys it has. Local ingest and Ray both write these.
    ``size_wh`` may also carry ``photo``, the facts of the image's EXIF."""
    metadata = item.metadata
    if namespace is not None:
        width, height = int(size_wh.width), int(size_wh.height)
        photo = getattr(size_wh, "photo", None)
        metadata = with_derived(
            metadata, namespace=namespace, width=width, height=height, sha256=sha256, size=size, photo=photo
        )
    return NewItem(item.id, metadata, sha256, size, item.mtime_ns, item.fingerprint, item.text, text_vector)


def failure_record(item: SourceItem, reason: str) -> FailureRecord:
    return FailureRecord(
        id=item.id,
        source=item.source,
        reason=reason,
        size=item.size,
        mtime_ns=item.mtime_ns,
        metadata=dict(item.metadata),
        fingerprint=item.fingerprint,
    )
