"""Async use: ``async with cache.ause(name)`` never borrows the event loop's default executor, a hit
is served on the loop, a cancelled waiter gives its place back at once, and a service whose
inference runs in ``asyncio.to_thread`` serves every request on a tight budget."""
import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

import modelcache as mc
from modelcache.moves import ACQUIRERS
from conftest import array_loader


class RefusingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A default executor that counts what it is given (and still runs it)."""

    def __init__(self):
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


def test_ause_never_uses_the_default_executor_and_serves_hits_on_the_loop(make_cache):
    cache = make_cache(device_budget=250)
    for i in range(3):
        cache.register(f"m{i}", array_loader(i, nbytes=100))

    async def main():
        executor = RefusingExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        for _ in range(3):
            for i in range(3):                       # two fit: every round has misses
                async with cache.ause(f"m{i}") as model:
                    assert int(model[0]) == i
        return executor.submitted
    assert asyncio.run(main()) == 0
    workers = cache._moves.workers.threads()
    assert cache.stats()["misses"] >= 3

    async def hits():
        for _ in range(50):
            lease = cache.ause("m2")
            async with lease as model:               # resident: no worker thread involved
                assert int(model[0]) == 2
            assert lease.hit is True
    asyncio.run(hits())
    assert cache._moves.workers.threads() == workers


def test_a_lease_from_use_works_with_async_with_too(make_cache):
    cache = make_cache()
    cache.register("a", array_loader(7, nbytes=100))

    async def main():
        async with cache.use("a") as model:
            assert cache.info("a").leases == 1
            return int(model[0])
    assert asyncio.run(main()) == 7
    assert cache.info("a").leases == 0


def test_a_cancelled_waiter_gives_its_place_back_at_once(make_cache):
    """b waits for room that a (leased) holds; cancelling the request takes it out of the line at
    once, and its thread stops waiting soon after; nothing stays leased."""
    cache = make_cache(device_budget=150)
    cache.register("a", array_loader(1, nbytes=100))
    cache.register("b", array_loader(2, nbytes=100))
    held = cache.use("a")
    held.acquire()

    async def main():
        task = asyncio.create_task(cache.ause("b", timeout=30).__aenter__())
        for _ in range(200):
            await asyncio.sleep(0.005)
            if cache._ledger.waiting:
                break
        assert len(cache._ledger.waiting) == 1, "b never lined up for room"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not cache._ledger.waiting          # at once: before its thread even woke
    asyncio.run(main())
    deadline = time.monotonic() + 2
    while cache._moves.workers.busy() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert cache._moves.workers.busy() == 0
    held.release()
    assert cache.info("b").leases == 0 and cache.info("a").leases == 0
    with cache.use("b", timeout=5) as model:      # the room is there for the next request
        assert int(model[0]) == 2


def test_a_request_cancelled_during_its_load_leaves_the_model_for_the_next(make_cache):
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)
        return np.full(100, 3, np.uint8)
    cache = make_cache()
    cache.register("slow", slow)

    async def main():
        task = asyncio.create_task(cache.ause("slow").__aenter__())
        while not started.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())
    release.set()
    with cache.use("slow", timeout=5) as model:
        assert int(model[0]) == 3
    assert cache.info("slow").loads == 1 and cache.info("slow").leases == 0


def test_two_hundred_concurrent_requests_with_inference_in_to_thread(make_cache):
    """The issue's service: 200 concurrent requests over 6 models of which 2 fit, acquisition by
    ause, inference in asyncio.to_thread on a small default executor. Every request is served
    (no DeviceBusyError), and the answers are the models' own."""
    cache = make_cache(device_budget=250)
    for i in range(6):
        cache.register(f"m{i}", array_loader(i, nbytes=100))

    def infer(model):
        time.sleep(0.002)
        return int(model.sum())

    async def request(k):
        name = f"m{k % 6}"
        async with cache.ause(name, timeout=30) as model:
            return name, await asyncio.to_thread(infer, model)

    async def main():
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=6))
        return await asyncio.gather(*(request(k) for k in range(200)), return_exceptions=True)
    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(total == 100 * int(name[1:]) for name, total in results)
    assert cache.stats()["leases.active"] == 0
    # the misses waited on a bounded set of threads (a thread each would have been ~190: hundreds
    # of threads waking for the GIL starve the event loop), and more than one of them was used
    assert 1 < cache._moves.acquirers.threads() <= ACQUIRERS
