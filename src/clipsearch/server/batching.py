"""Dynamic batching: inputs from many concurrent requests become model-sized batches, fairly.

Each request's inputs form a job; the batching loop builds each batch by taking inputs from the
waiting jobs in turn (one from each, round and round), so a one-text query sent while a
2048-text request is being embedded rides in the very next batch instead of waiting behind all
of it. A request that goes away (its client disconnected, or it failed) cancels its futures, and
its queued inputs are dropped without a model call. The model runs in model threads, outside the
event loop: one batch at a time, or ``concurrency`` at once, each on its own thread. Under load, a
batch may wait ``max_wait`` seconds to fill up; a lone request never waits, because the wait only
applies when the previous batch held more than one input.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_Entry = tuple[T, asyncio.Future]


class MicroBatcher(Generic[T, R]):
    """``run_batch`` maps a list of inputs to one result per input (e.g. the rows of a matrix)."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        executor: Executor,
        max_batch: int = 64,
        max_wait: float = 0.005,
        concurrency: int = 1,
    ):
        self._run_batch = run_batch
        self._executor = executor
        # batches in the model at once (each on its own thread of ``executor``); while all run,
        # inputs gather for the next ones
        self.concurrency = max(1, concurrency)
        self._running: set[asyncio.Task] = set()
        self._slot: asyncio.Event | None = None  # set when a running batch ends
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self._jobs: deque[deque[_Entry]] = deque()  # one per request, in turn
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._last_batch = 0
        # told each batch's size before the model runs it (the server's metrics)
        self.observe: Callable[[int], None] | None = None
        self.items = 0  # inputs embedded so far (the tests read it)
        self.dropped = 0  # inputs of gone requests dropped without a model call

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wakeup = asyncio.Event()
        self._slot = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, items: list[T]) -> list[R]:
        """Results for ``items`` in order; the first error of any batch is raised."""
        if self._wakeup is None:
            raise RuntimeError("batcher not started")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        if not futures:
            return []
        self._jobs.append(deque(zip(items, futures, strict=True)))
        self._wakeup.set()
        try:
            results = await asyncio.gather(*futures)
        except BaseException:
            for fut in futures:  # a cancelled request frees its queued slots
                fut.cancel()
            raise
        return results

    def pending(self) -> int:
        """Inputs waiting for the model."""
        return self._pending()

    def _pending(self) -> int:
        return sum(len(job) for job in self._jobs)

    def _take(self) -> list[_Entry]:
        """Up to ``max_batch`` live inputs, one from each waiting job in turn."""
        batch: list[_Entry] = []
        while len(batch) < self.max_batch and self._jobs:
            job = self._jobs.popleft()
            while job and job[0][1].done():  # its request is gone: no model time for it
                job.popleft()
                self.dropped += 1
            if not job:
                continue
            batch.append(job.popleft())
            if job:
                self._jobs.append(job)
        return batch

    async def _loop(self) -> None:
        assert self._wakeup is not None and self._slot is not None
        try:
            while True:
                while not self._jobs:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                while len(self._running) >= self.concurrency:  # the batch is taken once a thread is free
                    self._slot.clear()
                    await self._slot.wait()
                if self._last_batch > 1 and self.max_wait > 0 and self._pending() < self.max_batch - 1:
                    await asyncio.sleep(self.max_wait)
                live = self._take()
                self._last_batch = len(live)
                if not live:
                    continue
                if self.observe is not None:
                    self.observe(len(live))
                task = asyncio.ensure_future(self._run(live))
                self._running.add(task)
                task.add_done_callback(self._finished)
        finally:
            for task in self._running:
                task.cancel()

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        assert self._slot is not None
        self._slot.set()

    async def _run(self, live: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self._executor, self._run_batch, [item for item, _ in live])
        except Exception as e:  # the model failed: every waiting request gets the error
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            return
        self.items += len(live)
        for (_, fut), row in zip(live, out, strict=True):
            if not fut.done():
                fut.set_result(row)
