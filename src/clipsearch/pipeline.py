"""The ingest pipeline: source items -> selection (filters, sample) -> skip check -> download
(URLs, ``download_cache``) -> read + hash + decode + crop (worker threads or processes, ``decode_stage``)
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
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .decode_stage import DecodeSettings, Unchanged, decode_item, failure_reason
from .download_cache import NOT_CACHED, DownloadCache, Downloader, DownloadSettings
from .errors import UsageError, count_failure_kinds, failure_kind
from .identity import ModelSpec
from .imaging import DEFAULT_MAX_MEGAPIXELS
from .sources import Source, SourceItem, filter_items, sample_items
from .store import FailureRecord, FileState, NewItem, Store, claim_owner
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
    """How an ingest runs (``Collection.ingest(sources, IngestOptions(...))``). The namespace and
    the model are the collection's; the sources, catalog columns, Ray and pruning are arguments
    of ``Collection.ingest``."""

    batch_size: int = 32
    limit: int | None = None  # embed at most this many new items (failures do not count)
    workers: int | None = None  # decode workers; default: see default_workers()
    worker_type: str = "auto"  # auto | thread | process
    retry_failed: bool = False
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    filters: dict[str, Any] | None = None  # only items whose metadata matches (``filters``)
    sample: int | None = None  # a reproducible random subset of this many items
    seed: int = 0
    embed_text: bool = False  # also store the text tower's vector of each item's text
    offline: bool = False  # URLs only from the download cache
    cache_dir: Path | None = None  # download cache; default: beside the database
    download: DownloadSettings = field(default_factory=DownloadSettings)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError("batch_size must be at least 1", param="batch_size")
        resolve_worker_type(self.worker_type, "cpu")  # a typo fails before any model loads


@dataclass
class IngestReport:
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    previously_failed: int = 0  # skipped: they failed before, and retry_failed was not asked
    claimed_elsewhere: int = 0  # left to another ingest process working on the same namespace
    repeated_ids: int = 0  # items whose id an earlier item (e.g. catalog row) already had: not ingested
    removed: int = 0  # prune: items whose file is gone, deleted
    moved: int = 0  # prune: items whose file was renamed or moved, kept with their vector
    seconds: float = 0.0
    interrupted: bool = False
    runtime: str = ""  # what the model ran on (torch, onnx); "" when none was loaded
    failures: list[FailureRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON data (``ingest --json``, the server's watch log)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "failures"}
        data["seconds"] = round(self.seconds, 3)
        data["failures_by_kind"] = self.failures_by_kind()
        data["failures"] = [
            {"id": f.id, "source": f.source, "reason": f.reason, "kind": failure_kind(f.reason)} for f in self.failures
        ]
        return data

    def failures_by_kind(self) -> dict[str, int]:
        """How many of this run's failures are of each kind (``errors.failure_kind``), most first."""
        return count_failure_kinds(f.reason for f in self.failures)


@dataclass
class IngestPlan:
    """What an ingest considers, listed before any model loads or any cluster starts: the
    selected items (each id once, then ``filters`` and ``sample``), how many repeated an id, and
    how many the sources listed in all."""

    items: list[SourceItem]
    repeated_ids: int = 0
    listed: int = 0

    @classmethod
    def of(cls, sources: Iterable[Source], options: IngestOptions) -> IngestPlan:
        report = IngestReport()
        listed = [it for source in sources for it in source]
        items = select(listed, options, report)
        return cls(items, report.repeated_ids, len(listed))


@dataclass
class IngestPreview:
    """What an ingest would do (``ingest --dry-run``), found without a model, a download or a
    write: the counts of the plan's items by what would happen to each."""

    listed: int = 0  # items (rows) the sources list
    selected: int = 0  # after filters and sample, each id once
    repeated_ids: int = 0
    unchanged: int = 0  # stored and unchanged: skipped
    previously_failed: int = 0  # failed before, unchanged: skipped unless retry_failed
    new: int = 0  # not stored yet: read (or fetched) and embedded
    changed: int = 0  # stored, changed since: read again; embedded if the image changed
    files: int = 0  # of new and changed: local files to read
    cached: int = 0  # of new and changed: URLs in the download cache
    to_fetch: int = 0  # of new and changed: URLs to download
    will_fail: dict[str, int] = field(default_factory=dict)  # of new and changed: failing at once, by kind
    limit: int | None = None  # at most this many embedded

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def preview(
    store: Store, namespace: str, plan: IngestPlan, options: IngestOptions, cache_dir: Path | None
) -> IngestPreview:
    """The ``IngestPreview`` of ``plan``: what the store and the download cache (at ``cache_dir``,
    opened only if it exists) say of each item, as a run would find it."""
    out = IngestPreview(
        listed=plan.listed, selected=len(plan.items), repeated_ids=plan.repeated_ids, limit=options.limit
    )
    exists = store.namespace(namespace) is not None
    cache = None
    if cache_dir is not None and (Path(cache_dir) / "index.db").is_file():
        cache = DownloadCache(cache_dir)
    failing: Counter[str] = Counter()
    try:
        for start in range(0, len(plan.items), _LOOKUP_CHUNK):
            chunk = plan.items[start : start + _LOOKUP_CHUNK]
            if exists:
                report = IngestReport()
                todo = filter_known(store, namespace, chunk, report, lambda n=1: None, options)
                out.unchanged += report.skipped
                out.previously_failed += report.previously_failed
            else:
                todo = [(item, None) for item in chunk]
            for item, known in todo:
                if known is None:
                    out.new += 1
                else:
                    out.changed += 1
                if item.error is not None:
                    failing[failure_kind(item.error)] += 1
                elif item.url is None:
                    out.files += 1
                elif cache is not None and cache.lookup(item.url) is not None:
                    out.cached += 1
                elif options.offline:
                    failing[failure_kind(NOT_CACHED)] += 1
                elif cache is not None and not options.retry_failed and (why := cache.recent_failure(item.url)):
                    failing[f"{failure_kind(why)} (failed recently)"] += 1
                else:
                    out.to_fetch += 1
    finally:
        if cache is not None:
            cache.close()
    out.will_fail = dict(failing.most_common())
    return out


ProgressCallback = Callable[[int, int], None]  # (items done, items total)
Candidates = Iterator[tuple[SourceItem, FileState | None]]
Advance = Callable[..., None]  # advance(n=1): n more items are done


class IngestExecutor(Protocol):
    """Where decoding, embedding and writing happen: this process (``LocalExecutor``) or a Ray
    cluster (``distributed.RayExecutor``). ``Ingestor.run`` owns the rest of the frame."""

    def start(self, ingestor: Ingestor) -> None:
        """Get ready (start a cluster, check options); not counted in the report's seconds."""

    def execute(self, ingestor: Ingestor, candidates: Candidates, report: IngestReport, advance: Advance) -> None:
        """Decode, embed and write ``candidates`` (claimed items with what the store knows of
        each), counting into ``report`` and ``advance``; on Ctrl-C set ``report.interrupted``."""


def default_workers(worker_type: str = "thread") -> int:
    """Threads: one per core, at most 4 (the model uses the cores too). Processes (GPU): every
    core but one, which feeds the GPU."""
    cores = os.cpu_count() or 1
    if worker_type == "process":
        return max(1, cores - 1)
    return max(1, min(4, cores))


def resolve_worker_type(requested: str, device: str) -> str:
    if requested not in ("auto", "thread", "process"):
        raise UsageError(f"unknown worker type {requested!r}; use auto, thread or process", param="worker_type")
    if requested != "auto":
        return requested
    return "thread" if device == "cpu" else "process"


class Ingestor:
    """One ingest into one namespace: the frame every executor shares. It binds the namespace
    to the model, claims the items that need work a batch at a time, hands them to the
    executor, releases what is left, builds the index and times the run."""

    def __init__(self, store: Store, encoder: Encoder, model_spec: ModelSpec, namespace: str, options: IngestOptions):
        self.store = store
        self.encoder = encoder
        self.model_spec = model_spec
        self.namespace = namespace
        self.options = options
        self.decode = DecodeSettings(encoder.preprocess_spec, options.max_megapixels, model_spec.decode)
        self.owner = claim_owner()
        store.bind_namespace(namespace, encoder.identity, model_spec.to_dict())

    def run(
        self,
        plan: IngestPlan | Iterable[Source],
        executor: IngestExecutor | None = None,
        progress: ProgressCallback | None = None,
    ) -> IngestReport:
        """Ingest the plan's items (or the sources') on ``executor`` (this process by default)."""
        if not isinstance(plan, IngestPlan):
            plan = IngestPlan.of(plan, self.options)
        executor = executor or LocalExecutor()
        executor.start(self)
        started = time.perf_counter()
        report = IngestReport(repeated_ids=plan.repeated_ids)
        total = len(plan.items)
        advance = progress_counter(total, progress)
        try:
            executor.execute(self, self.candidates(plan.items, report, advance), report, advance)
        finally:
            self.store.release(self.namespace, self.owner)
        if report.embedded and not report.interrupted:
            self.store.build_index(self.namespace)
        report.seconds = time.perf_counter() - started
        if progress and not report.interrupted:
            progress(total, total)
        return report

    def candidates(self, items: list[SourceItem], report: IngestReport, advance: Advance) -> Candidates:
        """The items that need work, looked up in the store a chunk at a time, and claimed a
        batch at a time just before they are needed: another ingest process working on the
        same items takes the batches this one has not reached yet."""
        step = self.options.batch_size
        for start in range(0, len(items), _LOOKUP_CHUNK):
            todo = filter_known(
                self.store, self.namespace, items[start : start + _LOOKUP_CHUNK], report, advance, self.options
            )
            for first in range(0, len(todo), step):
                part = todo[first : first + step]
                claimed = self.store.claim(self.namespace, [item.id for item, _ in part], self.owner)
                if len(claimed) < len(part):
                    report.claimed_elsewhere += len(part) - len(claimed)
                    advance(len(part) - len(claimed))
                # looked up again: another process may have stored (and released) some meanwhile
                again = [item for item, _ in part if item.id in claimed]
                yield from filter_known(self.store, self.namespace, again, report, advance, self.options)

    def embed_texts(self, items: list[NewItem]) -> None:
        """With ``embed_text``: each item's text vector, beside its image vector."""
        with_text = [it for it in items if it.text]
        if with_text:
            vectors = self.encoder.embed_texts([it.text or "" for it in with_text])
            for it, vector in zip(with_text, vectors, strict=True):
                it.text_vector = vector

    def cache_dir(self) -> Path:
        if self.options.cache_dir is not None:
            return Path(self.options.cache_dir).expanduser().absolute()  # stored paths are read from anywhere
        return default_cache_dir(self.store.location)


class LocalExecutor:
    """Decode in worker threads or processes of this process, embed on its model, write a
    batch at a time. Downloads, decoding and the model overlap (see the module docstring)."""

    def __init__(self) -> None:
        self.worker_type = "thread"
        self.workers = 1

    def start(self, ingestor: Ingestor) -> None:
        device = str(getattr(ingestor.encoder, "device", "cpu")).split(":")[0]
        self.worker_type = resolve_worker_type(ingestor.options.worker_type, device)
        self.workers = ingestor.options.workers or default_workers(self.worker_type)

    def execute(self, ingestor: Ingestor, candidates: Candidates, report: IngestReport, advance: Advance) -> None:
        _LocalRun(self, ingestor, report, advance).run(candidates)

    def pool(self) -> Executor:
        if self.worker_type == "process":
            # spawn: a fresh interpreter that imports only the decode stage, never a fork of a
            # process holding a model and thread pools
            context = multiprocessing.get_context("spawn")
            return ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="clipsearch-decode")


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


class _LocalRun:
    """The state of one local execution: the decode window, the batch being filled, the
    failures and unchanged items waiting for the next write."""

    def __init__(self, executor: LocalExecutor, ingestor: Ingestor, report: IngestReport, advance: Advance):
        self.executor = executor
        self.ingestor = ingestor
        self.options = ingestor.options
        self.report = report
        self.advance = advance
        self.batch: list[_Prepared] = []
        self.pending_failures: list[FailureRecord] = []
        self.pending_touched: list[NewItem] = []
        self.queued = 0  # items in flight or embedded: they count against the limit
        self.in_flight: deque[_InFlight] = deque()
        self.pool = executor.pool()

    def run(self, candidates: Candidates) -> None:
        limit = self.options.limit
        window = max(2 * self.options.batch_size, 4 * self.executor.workers)
        ready = self.ready(candidates)
        try:
            for entry in ready:
                if entry is None:  # the network keeps us waiting: embed and commit what is here
                    while self.in_flight:
                        self.collect()
                    self.flush()
                    continue
                if limit is not None and self.queued >= limit:
                    break
                self.queued += 1
                if entry.error is not None:
                    self.fail(entry.item, entry.error)
                    continue
                flight = _InFlight(entry.item, entry.known, Future())
                self.submit(flight)
                self.in_flight.append(flight)
                while len(self.in_flight) >= window or (limit is not None and self.queued >= limit and self.in_flight):
                    self.collect()
                if limit is not None and self.queued >= limit:
                    break
            while self.in_flight:
                self.collect()
            self.flush()
        except KeyboardInterrupt:
            self.report.interrupted = True
            for flight in self.in_flight:
                flight.future.cancel()
        finally:
            ready.close()  # stops the downloads still running
            self.pool.shutdown(wait=not self.report.interrupted, cancel_futures=True)

    def flush(self) -> None:
        """Embed the batch and write it with the failures and unchanged items, in one transaction."""
        batch, failures, touched = self.batch, self.pending_failures, self.pending_touched
        if not batch and not failures and not touched:
            return
        ingestor = self.ingestor
        if batch:
            vectors = ingestor.encoder.embed_crops(np.stack([p.crop for p in batch]))
        else:
            vectors = np.zeros((0, ingestor.encoder.dim), np.float32)
        new_items = [p.item for p in batch]
        if self.options.embed_text:
            ingestor.embed_texts([*new_items, *touched])
        ingestor.store.write_batch(ingestor.namespace, new_items, vectors, failures, touched)
        self.report.embedded += len(batch)
        self.report.failed += len(failures)
        self.report.failures.extend(failures)
        self.advance(len(batch) + len(failures) + len(touched))
        self.batch, self.pending_failures, self.pending_touched = [], [], []

    def fail(self, item: SourceItem, reason: str) -> None:
        self.pending_failures.append(failure_record(item, reason))
        self.queued -= 1  # failed: it does not use up the limit
        if len(self.pending_failures) >= _MAX_PENDING_FAILURES:
            self.flush()

    def submit(self, entry: _InFlight) -> None:
        known_sha = entry.known.sha256 if entry.known else None
        entry.future = self.pool.submit(decode_item, entry.item, known_sha, self.ingestor.decode)

    def file_result(self, entry: _InFlight) -> None:
        """Put one finished item where it belongs: the batch, the failures or the touched."""
        item = entry.item
        try:
            result = entry.future.result()
        except Exception as e:  # one bad file must never stop the run
            self.fail(item, failure_reason(e))
            return
        if isinstance(result, Unchanged):
            # same bytes as stored: keep the vector, refresh what the source says
            self.pending_touched.append(item_row(item, result.sha256, result.size))
            self.report.skipped += 1
            self.queued -= 1  # unchanged: it does not use up the limit
            return
        row = item_row(item, result.sha256, result.size, namespace=self.ingestor.namespace, size_wh=result)
        self.batch.append(_Prepared(row, result.crop))
        if len(self.batch) >= self.options.batch_size:
            self.flush()

    def collect(self) -> None:
        entry = self.in_flight.popleft()
        # exception() waits for the item; Ctrl-C while waiting goes through
        if not isinstance(entry.future.exception(), BrokenProcessPool):
            self.file_result(entry)
            return
        # A decoder process died (a crash in a native decoder on some file), and every item
        # in flight with it. Decode those again one at a time in fresh processes, so that the
        # file that kills a process again is the one recorded as failed.
        suspects = [entry, *self.in_flight]
        self.in_flight.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self.executor.pool()
        for suspect in suspects:
            self.submit(suspect)
            if isinstance(suspect.future.exception(), BrokenProcessPool):
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = self.executor.pool()
            self.file_result(suspect)

    def ready(self, candidates: Candidates) -> Iterator[_Ready | None]:
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
        if self.options.limit is not None:  # with a limit of N, never download far ahead of N
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
                    cache = DownloadCache(self.ingestor.cache_dir())
                cached = cache.lookup(item.url)
                if cached is not None:
                    item.downloaded_to(cached)
                    yield _Ready(item, known)
                elif self.options.offline:
                    yield _Ready(item, known, NOT_CACHED)
                else:
                    if downloader is None:
                        downloader = Downloader(cache, settings, self.options.retry_failed)
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


def select(items: list[SourceItem], options: IngestOptions, report: IngestReport) -> list[SourceItem]:
    """The items to consider: those that pass ``--filter``, each id once, then ``--sample``."""
    listed = filter_items(items, options.filters)
    # ids repeat among the selected items only: a row the filter leaves out repeats nothing
    return sample_items(unique_items([listed], report), options.sample, options.seed)


@dataclass
class Survey:
    """What a plan holds to do, found in the store before any model loads (``survey``)."""

    done: IngestReport | None  # the report of a run with nothing to do; None if any item needs work
    to_embed: int  # items whose image may need embedding, counted up to ``at_most + 1``


def survey(store: Store, namespace: str, plan: IngestPlan, options: IngestOptions, at_most: int = -1) -> Survey:
    """One pass over the plan's items in the store. ``done``: the report when every item is
    stored or failed before, unchanged, so a re-run with nothing new loads no model (and starts no
    Ray cluster). ``to_embed``: the new items and the stored ones whose file may have changed; a
    file of the same size and modification time whose metadata alone changed (an image list that
    adds labels) is updated without its image, and a changed URL row counts (its bytes are known
    once fetched). The pass stops once there is work and more than ``at_most`` images to embed
    (the default, -1: at the first work)."""
    report = IngestReport(repeated_ids=plan.repeated_ids)
    work, to_embed = False, 0
    for start in range(0, len(plan.items), _LOOKUP_CHUNK):
        todo = filter_known(
            store, namespace, plan.items[start : start + _LOOKUP_CHUNK], report, lambda n=1: None, options
        )
        work = work or bool(todo)
        to_embed += sum(1 for item, known in todo if known is None or not _same_file(known, item))
        if work and to_embed > at_most:
            break
    return Survey(None if work else report, to_embed)


def _same_file(state: FileState, item: SourceItem) -> bool:
    return (
        item.url is None
        and item.size is not None
        and item.mtime_ns is not None
        and (state.size, state.mtime_ns) == (item.size, item.mtime_ns)
    )


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
