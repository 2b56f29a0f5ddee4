"""Watch mode: a collection kept in step with folders while it runs (``clipsearch watch``,
``serve --watch``).

watchfiles (the Rust ``notify`` crate: inotify, FSEvents, ReadDirectoryChangesW) reports what
changed. A batch of changes is applied once the folders have been quiet for ``quiet_ms`` (a copy
in progress keeps writing, so a file is read once it is whole), and at most ``max_wait_ms``
after its first change, as one pass over the whole folders through ``Collection.ingest``
(incremental: a file whose bytes did not change is not read again; with ``prune``, unless
switched off, a moved file keeps its vector and a deleted one leaves). Every pass reconciles the
store with the folders, so a change the OS did not report (an overflowing event queue, a file
that raced a pass) is repaired by the next one.

The OS watch starts before the first pass: a change made while that pass runs (minutes, on a
large library) is reported after it, never lost. A watched folder that vanishes is waited for;
when it is back, a full pass catches up and watching resumes (an OS watch dies with its folder).
``stop()`` ends the loop after the batch in flight; a KeyboardInterrupt during a pass (a second
Ctrl-C) ends it at once, the batch in flight rolled back, and reaches the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .collection import Collection
    from .pipeline import IngestOptions, IngestReport


@dataclass
class WatchEvent:
    """What the watcher did: a full pass (``sync``), a batch of changes (``batch``), or that it
    waits for folders that are gone (``waiting``)."""

    kind: str
    changes: int = 0  # changes reported by the OS for this batch
    report: IngestReport | None = None
    missing: list[Path] = field(default_factory=list)


class Watcher:
    def __init__(
        self,
        collection: Collection,
        folders: Iterable[str | Path],
        *,
        prune: bool = True,
        recursive: bool = True,
        quiet_ms: int = 500,
        max_wait_ms: int = 5000,
        on_event: Callable[[WatchEvent], None] | None = None,
        options: IngestOptions | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.collection = collection
        self.folders = [Path(f).expanduser().absolute() for f in folders]
        self.prune = prune
        self.recursive = recursive
        self.quiet_ms = quiet_ms
        self.max_wait_ms = max_wait_ms
        self.on_event = on_event or (lambda event: None)
        self.options = options
        self.progress = progress  # each pass's progress, as ``Collection.ingest`` reports it
        self._stop = threading.Event()

    def stop(self) -> None:
        """End the loop once the batch in flight is stored."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Watch until ``stop()``."""
        import watchfiles

        waiting: list[Path] = []
        while not self._stop.is_set():
            missing = [f for f in self.folders if not f.is_dir()]
            if missing:
                if missing != waiting:
                    self.on_event(WatchEvent("waiting", missing=missing))
                waiting = missing
                self._stop.wait(0.5)
                continue
            waiting = []
            # rust_timeout + yield_on_timeout: an empty batch each second, to notice a vanished
            # folder (its OS watch is gone with it) and the stop flag
            watch = watchfiles.watch(
                *self.folders,
                stop_event=self._stop,
                step=self.quiet_ms,
                debounce=self.max_wait_ms,
                rust_timeout=1000,
                yield_on_timeout=True,
                recursive=self.recursive,
                raise_interrupt=False,
            )
            try:
                # The OS watch exists once the generator has taken its first step (up to a
                # second): from then on every change is queued, so one made during the pass
                # below arrives as the next batch. What that step itself reports, the pass covers.
                if next(watch, None) is None:
                    break  # stopped
                self._ingest("sync", 0)
                for changes in watch:
                    if any(not f.is_dir() for f in self.folders):
                        break
                    if changes:
                        self._ingest("batch", len(changes))
                    if self._stop.is_set():
                        break
            finally:
                watch.close()

    def _ingest(self, kind: str, changes: int) -> None:
        """One incremental pass over the folders (every pass reconciles: see the module)."""
        started = time.perf_counter()
        report = self.collection.ingest(
            self.folders, self.options, progress=self.progress, prune=self.prune, recursive=self.recursive
        )
        report.seconds = time.perf_counter() - started
        self.on_event(WatchEvent(kind, changes=changes, report=report))
        if report.interrupted:
            # ingest caught the KeyboardInterrupt to roll back the batch in flight; the caller
            # asked to stop now, so the interrupt goes on to it
            self._stop.set()
            raise KeyboardInterrupt


def describe(event: WatchEvent) -> str:
    """One line for a terminal or a log."""
    if event.kind == "waiting":
        return f"waiting for {', '.join(str(p) for p in event.missing)} (gone)"
    r = event.report
    assert r is not None
    parts = [f"embedded {r.embedded}"]
    if r.removed:
        parts.append(f"removed {r.removed}")
    if r.moved:
        parts.append(f"moved {r.moved}")
    if r.failed:
        parts.append(f"failed {r.failed}")
    what = "synced the folders" if event.kind == "sync" else f"{event.changes} changes"
    return f"{time.strftime('%H:%M:%S')} {what}: {', '.join(parts)} ({r.seconds:.1f} s)"
