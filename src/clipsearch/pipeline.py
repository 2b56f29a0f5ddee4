"""The ingest pipeline: source items -> skip check -> read + hash + decode + crop (worker threads
or processes, ``decoding``) -> batched normalise + encode -> one store transaction per batch.

Decoding overlaps inference: a bounded window of items is in the workers while the model runs
on the previous batch. On a CPU the workers are threads (the decoders release the GIL, and the
model needs the cores more than a second interpreter does); with a GPU they are processes, since
decoding is then the bottleneck and must scale past one interpreter.

Properties it guarantees:
- resumable: every batch commits its vectors and failures together, so a crash or Ctrl-C loses
  at most the batch in flight, and the next run skips everything already stored;
- incremental: an item whose size and mtime, or failing that whose content hash, matches the
  store is skipped without decoding; a changed file is embedded again under the same id;
- robust: any failure to read or decode becomes a recorded failure with its reason.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .decoding import DecodeSettings, Unchanged, decode_item
from .encoders import Encoder, ModelSpec
from .errors import ImageError, UsageError
from .imaging import DEFAULT_MAX_MEGAPIXELS
from .sources import Source, SourceItem
from .store import DEFAULT_NAMESPACE, FailureRecord, FileState, NewItem, Store

_LOOKUP_CHUNK = 512


@dataclass
class IngestOptions:
    namespace: str = DEFAULT_NAMESPACE
    batch_size: int = 32
    limit: int | None = None
    workers: int | None = None  # decode workers; default: see default_workers()
    worker_type: str = "auto"  # auto | thread | process
    retry_failed: bool = False
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    draft: bool = True  # DCT-scaled JPEG decode


@dataclass
class IngestReport:
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    previously_failed: int = 0  # skipped because they failed before and --retry-failed was not given
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[FailureRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "embedded": self.embedded,
            "skipped": self.skipped,
            "failed": self.failed,
            "previously_failed": self.previously_failed,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "failures": [{"id": f.id, "source": f.source, "reason": f.reason} for f in self.failures],
        }


@dataclass
class _Prepared:
    item: NewItem
    crop: np.ndarray


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
        self.settings = DecodeSettings(encoder.preprocess_spec, options.max_megapixels, options.draft)
        store.bind_namespace(self.namespace, encoder.identity, model_spec.to_dict())

    def _executor(self) -> Executor:
        if self.worker_type == "process":
            # spawn: a fresh interpreter that imports only the decode stage, never a fork of a
            # process holding a model and thread pools
            context = multiprocessing.get_context("spawn")
            return ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="clipsearch-decode")

    def run(self, sources: Iterable[Source], progress: ProgressCallback | None = None) -> IngestReport:
        started = time.perf_counter()
        report = IngestReport()
        items = self._unique(sources)
        total = len(items)
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        if progress:
            progress(0, total)
        pending_failures: list[FailureRecord] = []
        pending_touched: list[NewItem] = []
        batch: list[_Prepared] = []
        limit = self.options.limit
        queued = 0  # items in flight or embedded: they count against --limit

        def flush() -> None:
            if not batch and not pending_failures and not pending_touched:
                return
            if batch:
                vectors = self.encoder.embed_crops(np.stack([p.crop for p in batch]))
            else:
                vectors = np.zeros((0, self.encoder.dim), np.float32)
            self.store.write_batch(self.namespace, [p.item for p in batch], vectors, pending_failures, pending_touched)
            report.embedded += len(batch)
            report.failed += len(pending_failures)
            report.failures.extend(pending_failures)
            advance(len(batch) + len(pending_failures) + len(pending_touched))
            batch.clear()
            pending_failures.clear()
            pending_touched.clear()

        window = max(2 * self.options.batch_size, 4 * self.workers)
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
            except ImageError as e:
                reason = e.message
            except MemoryError:
                reason = "out of memory while decoding"
            except BrokenProcessPool:
                reason = "the decoder process crashed on this file"
            except Exception as e:  # one bad file must never stop the run
                reason = f"unexpected {type(e).__name__}: {e}"
            else:
                if isinstance(result, Unchanged):
                    pending_touched.append(NewItem(item.id, {}, result.sha256, result.size, item.mtime_ns))
                    report.skipped += 1
                    queued -= 1  # failed or unchanged: it does not use up the limit
                    return
                metadata = dict(item.metadata)
                metadata.update(
                    namespace=self.namespace,
                    width=result.width,
                    height=result.height,
                    sha256=result.sha256,
                    bytes=result.size,
                )
                new = NewItem(item.id, metadata, result.sha256, result.size, item.mtime_ns)
                batch.append(_Prepared(new, result.crop))
                if len(batch) >= self.options.batch_size:
                    flush()
                return
            pending_failures.append(_failure(item, reason))
            queued -= 1

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

        try:
            for chunk_start in range(0, total, _LOOKUP_CHUNK):
                chunk = items[chunk_start : chunk_start + _LOOKUP_CHUNK]
                for item, known in self._filter_known(chunk, report, advance):
                    if limit is not None and queued >= limit:
                        break
                    entry = _InFlight(item, known, Future())
                    submit(entry)
                    in_flight.append(entry)
                    queued += 1
                    while len(in_flight) >= window or (limit is not None and queued >= limit and in_flight):
                        collect()
                if limit is not None and queued >= limit:
                    break
            while in_flight:
                collect()
            flush()
        except KeyboardInterrupt:
            report.interrupted = True
            for entry in in_flight:
                entry.future.cancel()
        finally:
            executor.shutdown(wait=not report.interrupted, cancel_futures=True)
        if report.embedded and not report.interrupted:
            self.store.build_index(self.namespace)
        report.seconds = time.perf_counter() - started
        if progress and not report.interrupted:
            progress(total, total)
        return report

    # -- stages ------------------------------------------------------------------------
    @staticmethod
    def _unique(sources: Iterable[Source]) -> list[SourceItem]:
        seen: set[str] = set()
        out = []
        for source in sources:
            for item in source:
                if item.id not in seen:
                    seen.add(item.id)
                    out.append(item)
        return out

    def _filter_known(
        self, chunk: list[SourceItem], report: IngestReport, advance: Callable[[int], None]
    ) -> list[tuple[SourceItem, FileState | None]]:
        """Drop items that are stored and unchanged (by size + mtime), or failed before."""
        ids = [it.id for it in chunk]
        stored = self.store.file_states(self.namespace, ids)
        failed = {} if self.options.retry_failed else self.store.failure_states(self.namespace, ids)
        todo = []
        for item in chunk:
            known = stored.get(item.id)
            if known is not None and _same_file(known, item):
                report.skipped += 1
                advance(1)
                continue
            prior = failed.get(item.id)
            if prior is not None and _same_file(prior, item):
                report.previously_failed += 1
                advance(1)
                continue
            todo.append((item, known))
        return todo


def _same_file(state: FileState, item: SourceItem) -> bool:
    return (
        state.size is not None
        and state.mtime_ns is not None
        and state.size == item.size
        and state.mtime_ns == item.mtime_ns
    )


def _failure(item: SourceItem, reason: str) -> FailureRecord:
    return FailureRecord(
        id=item.id,
        source=item.source,
        reason=reason,
        size=item.size,
        mtime_ns=item.mtime_ns,
        metadata=dict(item.metadata),
    )
