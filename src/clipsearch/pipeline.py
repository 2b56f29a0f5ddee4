"""The ingest pipeline: source items -> skip check -> read + hash + decode (threads) -> batched
encode -> one store transaction per batch.

Properties it guarantees:
- resumable: every batch commits its vectors and failures together, so a crash or Ctrl-C loses
  at most the batch in flight, and the next run skips everything already stored;
- incremental: an item whose size and mtime, or failing that whose content hash, matches the
  store is skipped without decoding; a changed file is embedded again under the same id;
- robust: any failure to read or decode becomes a recorded failure with its reason.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoders import Encoder, ModelSpec
from .errors import ImageError
from .imaging import DEFAULT_MAX_MEGAPIXELS, decode_image
from .sources import Source, SourceItem
from .store import DEFAULT_NAMESPACE, FailureRecord, FileState, NewItem, Store

_LOOKUP_CHUNK = 512


@dataclass
class IngestOptions:
    namespace: str = DEFAULT_NAMESPACE
    batch_size: int = 32
    limit: int | None = None
    workers: int | None = None  # decode threads; default: one per core, at most 4
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
    pixels: np.ndarray


@dataclass
class _Unchanged:
    item: NewItem  # same content as stored; only size/mtime are refreshed


ProgressCallback = Callable[[int, int], None]  # (items done, items total)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Ingestor:
    def __init__(self, store: Store, encoder: Encoder, model_spec: ModelSpec, options: IngestOptions):
        self.store = store
        self.encoder = encoder
        self.options = options
        self.namespace = options.namespace
        store.bind_namespace(self.namespace, encoder.identity, model_spec.to_dict())

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
            vectors = self.encoder.embed_pixels(np.stack([p.pixels for p in batch])) if batch else None
            self.store.write_batch(
                self.namespace,
                [p.item for p in batch],
                vectors if vectors is not None else np.zeros((0, self.encoder.dim), np.float32),
                pending_failures,
                pending_touched,
            )
            report.embedded += len(batch)
            report.failed += len(pending_failures)
            report.failures.extend(pending_failures)
            advance(len(batch) + len(pending_failures) + len(pending_touched))
            batch.clear()
            pending_failures.clear()
            pending_touched.clear()

        workers = self.options.workers or default_workers()
        window = max(2 * self.options.batch_size, 4 * workers)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipsearch-decode")
        in_flight: deque[tuple[SourceItem, Future]] = deque()
        try:
            for chunk_start in range(0, total, _LOOKUP_CHUNK):
                chunk = items[chunk_start : chunk_start + _LOOKUP_CHUNK]
                todo = self._filter_known(chunk, report, advance)
                for item, known in todo:
                    if limit is not None and queued >= limit:
                        break
                    in_flight.append((item, executor.submit(self._prepare, item, known)))
                    queued += 1
                    while len(in_flight) >= window or (limit is not None and queued >= limit and in_flight):
                        if not self._collect(in_flight.popleft(), batch, pending_failures, pending_touched, report):
                            queued -= 1  # failed or unchanged: it does not use up the limit
                        if len(batch) >= self.options.batch_size:
                            flush()
                if limit is not None and queued >= limit:
                    break
            while in_flight:
                self._collect(in_flight.popleft(), batch, pending_failures, pending_touched, report)
                if len(batch) >= self.options.batch_size:
                    flush()
            flush()
        except KeyboardInterrupt:
            report.interrupted = True
            for _, fut in in_flight:
                fut.cancel()
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

    def _prepare(self, item: SourceItem, known: FileState | None) -> _Prepared | _Unchanged:
        """Runs in a worker thread: read, hash, and (if new or changed) decode + preprocess."""
        try:
            data = item.read()
        except FileNotFoundError:
            raise ImageError("file does not exist") from None
        except IsADirectoryError:
            raise ImageError("is a directory, not a file") from None
        except OSError as e:
            raise ImageError(f"cannot read file ({e.strerror or e})") from None
        digest = hashlib.sha256(data).hexdigest()
        size = len(data)
        if known is not None and known.sha256 == digest:
            return _Unchanged(NewItem(item.id, {}, digest, size, item.mtime_ns))
        spec = self.encoder.preprocess_spec
        decoded = decode_image(
            data,
            max_megapixels=self.options.max_megapixels,
            draft_size=spec.draft_size if self.options.draft else None,
        )
        pixels = self.encoder.preprocess(decoded.image)
        metadata = dict(item.metadata)
        metadata.update(namespace=self.namespace, width=decoded.width, height=decoded.height, sha256=digest, bytes=size)
        return _Prepared(NewItem(item.id, metadata, digest, size, item.mtime_ns), pixels)

    def _collect(
        self,
        entry: tuple[SourceItem, Future],
        batch: list[_Prepared],
        failures: list[FailureRecord],
        touched: list[NewItem],
        report: IngestReport,
    ) -> bool:
        """Wait for one prepared item and file it; True if it joined the batch to embed."""
        item, fut = entry
        try:
            result = fut.result()
        except ImageError as e:
            failures.append(_failure(item, e.message))
            return False
        except MemoryError:
            failures.append(_failure(item, "out of memory while decoding"))
            return False
        except Exception as e:  # one bad file must never stop the run
            failures.append(_failure(item, f"unexpected {type(e).__name__}: {e}"))
            return False
        if isinstance(result, _Unchanged):
            touched.append(result.item)
            report.skipped += 1
            return False
        batch.append(result)
        return True


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
