"""The micro-batcher: concurrent submissions share model calls, in order, errors reach everyone."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from clipsearch.server.batching import MicroBatcher


def run(coro):
    return asyncio.run(coro)


def test_requests_arriving_while_the_model_works_share_one_batch():
    calls: list[list[int]] = []

    def model(items: list[int]) -> np.ndarray:
        calls.append(list(items))
        time.sleep(0.05)
        return np.asarray([[x, x * 10] for x in items], dtype=np.float32)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(model, pool, max_batch=64, max_wait=0.0)
            batcher.start()
            first = asyncio.create_task(batcher.submit([0]))
            await asyncio.sleep(0.01)  # the model is now busy with [0]
            rest = [asyncio.create_task(batcher.submit([i, i + 100])) for i in range(1, 9)]
            results = await asyncio.gather(first, *rest)
            await batcher.stop()
            return results

    results = run(main())
    assert calls[0] == [0]
    assert len(calls) == 2 and len(calls[1]) == 16  # the eight later requests, together
    np.testing.assert_array_equal(results[0], [[0, 0]])
    for i, out in enumerate(results[1:], 1):
        np.testing.assert_array_equal(out, [[i, i * 10], [i + 100, (i + 100) * 10]])


def test_a_lone_request_does_not_wait_and_batches_are_capped():
    calls: list[int] = []

    def model(items):
        calls.append(len(items))
        return np.zeros((len(items), 2), np.float32)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(model, pool, max_batch=4, max_wait=0.3)
            batcher.start()
            started = time.perf_counter()
            await batcher.submit(["one"])
            lone = time.perf_counter() - started
            await batcher.submit(list("abcdefghij"))
            await batcher.stop()
            return lone

    lone = run(main())
    assert lone < 0.2  # max_wait applies only under load
    assert calls[0] == 1 and max(calls) == 4 and sum(calls) == 11


def test_model_errors_reach_every_waiting_request_and_the_loop_survives():
    fail = threading.Event()
    fail.set()

    def model(items):
        if fail.is_set():
            raise RuntimeError("boom")
        return np.ones((len(items), 1), np.float32)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(model, pool)
            batcher.start()
            outcomes = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
            fail.clear()
            after = await batcher.submit([3])
            await batcher.stop()
            return outcomes, after

    outcomes, after = run(main())
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    np.testing.assert_array_equal(after, [[1.0]])


def test_submit_before_start_is_an_error():
    with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError):
        run(MicroBatcher(lambda x: x, pool).submit([1]))


@pytest.mark.parametrize("concurrency", [1, 2])
def test_batches_run_side_by_side_up_to_the_concurrency(concurrency):
    """Two batches meet at a barrier only if they run at once: with concurrency 2 both pass
    it; with 1 the first waits alone until it times out, and its inputs get that error."""
    barrier = threading.Barrier(2, timeout=2.0)

    def model(items: list[int]) -> list[int]:
        barrier.wait()
        return [x * 2 for x in items]

    async def main():
        with ThreadPoolExecutor(2) as pool:
            batcher = MicroBatcher(model, pool, max_batch=1, max_wait=0.0, concurrency=concurrency)
            batcher.start()
            results = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
            await batcher.stop()
            return results

    results = run(main())
    if concurrency == 2:
        assert results == [[2], [4]]
    else:
        assert isinstance(results[0], threading.BrokenBarrierError)
