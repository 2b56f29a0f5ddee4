"""Dynamic batching: single inputs from many concurrent requests become model-sized batches.

Each request puts its inputs on a queue and awaits their futures. One loop per batcher takes
what is queued (up to ``max_batch``) and runs the model on it in the model thread, outside the
event loop. Under load, a batch may wait ``max_wait`` seconds to fill up; a lone request never
waits, because the wait only applies when the previous batch held more than one input.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """``run_batch`` maps a list of inputs to one result per input (e.g. the rows of a matrix)."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        executor: Executor,
        max_batch: int = 64,
        max_wait: float = 0.005,
    ):
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self._last_batch = 0
        self.items = 0  # inputs embedded so far (the tests read it)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, items: list[T]) -> list[R]:
        """Results for ``items`` in order; the first error of any batch is raised."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures, strict=True):
            self._queue.put_nowait((item, fut))
        try:
            results = await asyncio.gather(*futures)
        except BaseException:
            for fut in futures:  # a cancelled request frees its queued slots
                fut.cancel()
            raise
        return results

    async def _loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            if self._last_batch > 1 and self.max_wait > 0 and queue.qsize() < self.max_batch - 1:
                await asyncio.sleep(self.max_wait)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            live = [(item, fut) for item, fut in batch if not fut.done()]
            self._last_batch = len(batch)
            if not live:
                continue
            try:
                out = await loop.run_in_executor(self._executor, self._run_batch, [item for item, _ in live])
            except Exception as e:  # the model failed: every waiting request gets the error
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.items += len(live)
            for (_, fut), row in zip(live, out, strict=True):
                if not fut.done():
                    fut.set_result(row)
