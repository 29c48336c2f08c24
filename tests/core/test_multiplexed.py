"""``@cache.multiplexed``: sync and async loaders, ``with`` and ``async with``, a bound on ids, an
id check, and arguments checked when decorating."""
import asyncio
import threading

import numpy as np
import pytest

import modelcache as mc


def test_sync_loader_with_and_async_with(make_cache):
    cache = make_cache(device_budget=300)
    seen = []

    @cache.multiplexed(prefix="mx:")
    def load(model_id):
        seen.append(model_id)
        return np.full(100, len(model_id), np.uint8)

    with load("en") as model:
        assert int(model[0]) == 2

    async def main():
        async with load("de-v2") as model:
            return int(model[0])
    assert asyncio.run(main()) == 5
    assert seen == ["en", "de-v2"] and {"mx:en", "mx:de-v2"} <= {e.name for e in cache.entries()}


def test_an_async_def_loader_is_awaited_on_the_requesters_loop(make_cache):
    cache = make_cache()
    loops = []

    @cache.multiplexed()
    async def load(model_id):
        await asyncio.sleep(0.001)
        loops.append(asyncio.get_running_loop())
        return np.full(100, 9, np.uint8)

    async def main():
        async with load("a") as model:
            return asyncio.get_running_loop(), int(model[0])
    loop, value = asyncio.run(main())
    assert value == 9 and loops == [loop]            # the requester's loop, not one of its own
    with load("b") as model:                         # synchronous use: a loop of its own
        assert int(model[0]) == 9
    assert len(loops) == 2 and loops[1] is not loop


def test_an_async_loader_registered_directly_works_from_sync_code(make_cache):
    cache = make_cache()

    async def load():
        return np.full(100, 4, np.uint8)
    cache.register("a", load)
    with cache.use("a", timeout=None) as model:       # in the caller's thread, no loop running
        assert int(model[0]) == 4

    async def sync_use_inside_a_loop():               # a loop runs in this thread: awaited apart
        cache.register("b", load)
        with cache.use("b", timeout=None) as model:
            return int(model[0])
    assert asyncio.run(sync_use_inside_a_loop()) == 4


def test_beyond_max_models_the_least_recently_used_unleased_id_goes(make_cache):
    cache = make_cache(device_budget=1000)
    calls = []

    @cache.multiplexed(max_models=2)
    def load(model_id):
        calls.append(model_id)
        return np.full(100, ord(model_id), np.uint8)

    for model_id in ("a", "b", "a", "c"):            # b is the least recently used when c comes
        with load(model_id):
            pass
    assert sorted(e.name for e in cache.entries()) == ["a", "c"]
    assert load.model_ids() == ["a", "c"]
    held = load("a")
    held.acquire()                                   # a is leased: it stays; c (least recent unleased) goes
    with load("b"):
        pass
    with load("d"):
        pass
    assert "a" in {e.name for e in cache.entries()} and len(cache.entries()) <= 3
    held.release()
    with load("e"):
        pass
    assert len(cache.entries()) == 2 and "e" in {e.name for e in cache.entries()}


def test_an_id_unregistered_before_its_lease_is_entered_is_registered_again(make_cache):
    cache = make_cache(device_budget=1000)

    @cache.multiplexed(max_models=1)
    def load(model_id):
        return np.full(100, ord(model_id), np.uint8)

    lease = load("a")
    with load("b"):                                  # pushes a out before its lease is entered
        pass
    assert "a" not in {e.name for e in cache.entries()}
    with lease as model:
        assert int(model[0]) == ord("a")


@pytest.mark.parametrize("bad", ["../../../../etc/passwd", "a/b", "a\\b", "..", "x\x00y", "../x"])
def test_the_default_id_check_refuses_paths(make_cache, bad):
    cache = make_cache()
    called = []

    @cache.multiplexed()
    def load(model_id):
        called.append(model_id)
        return f"models/{model_id}.onnx"

    with pytest.raises(mc.ConfigError, match="refused by the id check"):
        load(bad)
    assert called == [] and not cache.entries()


def test_id_checks_pattern_and_callable(make_cache):
    cache = make_cache(device_budget=1000)

    @cache.multiplexed(check_id=r"[a-z]{2}(-v\d+)?")
    def load(model_id):
        return np.zeros(10, np.uint8)
    with load("en-v2"):
        pass
    with pytest.raises(mc.ConfigError, match=r"must match"):
        load("eng")

    @cache.multiplexed(prefix="p:", check_id=lambda model_id: model_id.startswith("ok"))
    def load2(model_id):
        return np.zeros(10, np.uint8)
    with load2("ok.v1..x"):                         # the callable is the whole check
        pass
    with pytest.raises(mc.ConfigError):
        load2("no")


@pytest.mark.parametrize("kwargs, match", [
    ({"pinned": "yes"}, "pinned"),
    ({"backend": "no-such-backend"}, "no-such-backend"),
    ({"max_models": 0}, "max_models"),
    ({"max_models": 2.5}, "max_models"),
    ({"size_hint": "lots"}, "size_hint"),
    ({"check_id": "([a-z"}, "regular expression"),
    ({"check_id": 3}, "check_id"),
])
def test_arguments_are_checked_when_decorating(make_cache, kwargs, match):
    cache = make_cache()
    with pytest.raises(mc.ModelCacheError, match=match):
        cache.multiplexed(**kwargs)


def test_pinned_multiplexed_models_are_not_evicted(make_cache):
    cache = make_cache(device_budget=250)

    @cache.multiplexed(pinned=True)
    def load(model_id):
        return np.zeros(100, np.uint8)
    with load("a"):
        pass
    with load("b"):
        pass
    assert all(e.pinned and e.tier is mc.Tier.DEVICE for e in cache.entries())
    with pytest.raises(mc.DeviceBusyError):
        with load("c", timeout=0.2):
            pass


def test_concurrent_first_calls_register_once(make_cache):
    cache = make_cache(device_budget=1000)
    calls = []
    lock = threading.Lock()

    @cache.multiplexed()
    def load(model_id):
        with lock:
            calls.append(model_id)
        return np.zeros(100, np.uint8)
    barrier = threading.Barrier(8)

    def work():
        barrier.wait()
        with load("x"):
            pass
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["x"]
