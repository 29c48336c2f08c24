"""The request path: leases, hits and misses, room, errors on the way, decorators."""
import asyncio
import threading
import time

import numpy as np
import pytest

import modelcache as mc
from conftest import array_loader, tiers


def test_use_loads_then_hits(make_cache, device):
    cache = make_cache()
    calls = []
    cache.register("a", array_loader(7, calls=calls))
    assert cache.info("a").tier is mc.Tier.UNLOADED
    with cache.use("a") as model:
        assert model[0] == 7 and model.nbytes == 100
        info = cache.info("a")
        assert info.tier is mc.Tier.DEVICE and info.leases == 1 and info.device_bytes == 100
        assert device.process_bytes() == 100
    with cache.use("a") as model:
        assert model[0] == 7
    info = cache.info("a")
    assert (info.hits, info.misses, info.loads, info.leases) == (1, 1, 1, 0)
    assert calls == [7]
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["loads"] == 1
    assert stats["device.bytes"] == 100 and stats["swap_in.count"] == 1 and "swap_in.seconds.p50" in stats


def test_lease_says_whether_it_was_a_hit(make_cache):
    cache = make_cache()
    cache.register("a", array_loader(1))
    first, second = cache.use("a"), cache.use("a")
    first.acquire()
    second.acquire()
    assert (first.hit, second.hit) == (False, True)
    first.release()
    second.release()


def test_swap_back_in_from_host_does_not_reload(make_cache):
    cache = make_cache(device_budget=100)
    calls = []
    cache.register("a", array_loader(1, calls=calls))
    cache.register("b", array_loader(2, calls=calls))
    for name in ["a", "b", "a", "b"]:
        with cache.use(name) as m:
            assert m[0] == (1 if name == "a" else 2)
    assert calls == [1, 2]
    assert cache.info("a").tier is mc.Tier.HOST and cache.info("a").host_bytes == 100


def test_model_too_large(make_cache):
    cache = make_cache(device_budget=400)
    cache.register("big", array_loader(1, nbytes=401))
    with pytest.raises(mc.ModelTooLargeError) as err:
        with cache.use("big"):
            pass
    assert "big" in str(err.value) and "401" in str(err.value)
    with pytest.raises(mc.ModelTooLargeError):
        cache.register("hinted", array_loader(1), size_hint="1KiB")
    assert "hinted" not in cache


def test_device_busy_when_everything_is_leased(make_cache):
    cache = make_cache(device_budget=200)
    for name in "abc":
        cache.register(name, array_loader(ord(name)))
    with cache.use("a"), cache.use("b"):
        start = time.monotonic()
        with pytest.raises(mc.DeviceBusyError) as err:
            with cache.use("c", timeout=0.2):
                pass
        assert time.monotonic() - start >= 0.19
        assert "'c'" in str(err.value) and "leased" in str(err.value)
        assert isinstance(err.value, mc.LeaseTimeoutError) and not isinstance(err.value, TimeoutError)
    with cache.use("c"):  # room once the leases are gone
        pass
    assert cache.stats()["errors.busy"] == 1


def test_waiter_gets_room_when_lease_is_released(make_cache):
    cache = make_cache(device_budget=100)
    cache.register("a", array_loader(1))
    cache.register("b", array_loader(2))
    lease = cache.use("a")
    lease.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(cache.use("b", timeout=5).acquire()))
    t.start()
    time.sleep(0.1)
    assert not got and cache.info("a").tier is mc.Tier.DEVICE
    lease.release()
    t.join(5)
    assert got and got[0][0] == 2 and cache.info("a").tier is mc.Tier.HOST


def test_unknown_name(make_cache):
    cache = make_cache()
    with pytest.raises(mc.ModelNotFoundError, match="'nope'"):
        cache.info("nope")
    with pytest.raises(mc.ModelCacheError):
        with cache.use("nope"):
            pass


def test_duplicate_and_bad_registration(make_cache):
    cache = make_cache()
    cache.register("a", array_loader(1))
    with pytest.raises(mc.DuplicateModelError, match="'a'"):
        cache.register("a", array_loader(1))
    with pytest.raises(mc.ConfigError):
        cache.register("", array_loader(1))
    with pytest.raises(mc.ConfigError, match="backend='nosuch'"):
        cache.register("b", array_loader(1), backend="nosuch")


def test_loader_error_keeps_entry_retryable(make_cache):
    cache = make_cache()
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise IOError("disk on fire")
        return np.ones(10, np.uint8)

    cache.register("flaky", flaky)
    cache.register("ok", array_loader(3))
    with pytest.raises(mc.LoaderError) as err:
        with cache.use("flaky"):
            pass
    assert isinstance(err.value.__cause__, IOError)
    assert "flaky" in str(err.value) and "disk on fire" in str(err.value)
    info = cache.info("flaky")
    assert info.tier is mc.Tier.UNLOADED and "disk on fire" in info.last_error
    with cache.use("ok") as m:  # others keep serving
        assert m[0] == 3
    with cache.use("flaky") as m:
        assert m.sum() == 10
    assert cache.info("flaky").loads == 2 and cache.stats()["load_errors"] == 1


def test_unsupported_value(make_cache):
    cache = make_cache()
    cache.register("obj", lambda: object())
    with pytest.raises(mc.UnsupportedModelError, match="size_hint"):
        with cache.use("obj"):
            pass
    cache.register("hinted", lambda: object(), size_hint=50)
    with cache.use("hinted"):
        assert cache.info("hinted").device_bytes == 50


def test_value_loader_and_containers(make_cache):
    cache = make_cache()
    weights = {"w": np.zeros(30, np.uint8), "b": [np.zeros(20, np.uint8), b"x" * 10]}
    cache.register("dict", weights)           # a value, not a callable
    with cache.use("dict") as m:
        assert m is weights
    assert cache.info("dict").device_bytes == 60


def test_backend_failure_leaves_cache_consistent(make_cache, device):
    from modelcache.backends.python import PythonBackend

    class FragileBackend(PythonBackend):
        name = "fragile"

        def _to_device_impl(self, handle):
            raise RuntimeError("CUDA error: an illegal memory access")

    cache = make_cache(device_budget=200)
    cache.register("good", array_loader(1))
    cache.register("bad", array_loader(2), backend=FragileBackend)
    with cache.use("good"):
        pass
    with pytest.raises(mc.BackendError) as err:
        with cache.use("bad"):
            pass
    assert "bad" in str(err.value) and "illegal memory access" in str(err.value)
    assert cache.info("bad").tier is mc.Tier.HOST
    assert cache.stats()["device.accounted_bytes"] == 100 == device.process_bytes()
    with cache.use("good") as m:
        assert m[0] == 1


def test_model_decorator(make_cache):
    cache = make_cache()
    calls = []

    @cache.model("bert")
    def load_bert():
        calls.append(1)
        return np.arange(10, dtype=np.uint8)

    assert "bert" in cache and load_bert.model_name == "bert"
    with load_bert() as model:
        assert model[3] == 3
    with load_bert(timeout=1.0) as model:
        assert model[3] == 3
    assert calls == [1]


def test_multiplexed_decorator(make_cache):
    cache = make_cache(device_budget=200)
    seen = []

    @cache.multiplexed(prefix="mx:")
    def load(model_id):
        seen.append(model_id)
        return np.full(100, len(model_id), np.uint8)

    for model_id in ["en", "de-v2", "en", "fr", "de-v2"]:
        with load(model_id) as model:
            assert model[0] == len(model_id)
    assert seen == ["en", "de-v2", "fr"]   # evicted models wait on the host: no reload
    assert {"mx:en", "mx:de-v2", "mx:fr"} <= set(tiers(cache))
    cache.register("mx:other", array_loader(1))
    with pytest.raises(mc.DuplicateModelError):
        load("other")


def test_prefetch(make_cache):
    cache = make_cache()
    cache.register("a", array_loader(3))
    info = cache.prefetch("a").result(5)
    assert info.tier is mc.Tier.DEVICE and info.leases == 0 and info.hits == 0
    with cache.use("a"):
        pass
    assert cache.info("a").hits == 1
    cache.register("bad", lambda: 1 / 0)
    with pytest.raises(mc.LoaderError):
        cache.prefetch("bad").result(5)
    with pytest.raises(mc.ModelNotFoundError):
        cache.prefetch("missing")


def test_async_use(make_cache):
    cache = make_cache()
    cache.register("a", array_loader(4))

    async def main():
        async with cache.ause("a") as model:
            assert cache.info("a").leases == 1
            return int(model[0])

    assert asyncio.run(main()) == 4
    assert cache.info("a").leases == 0


def test_lease_misuse(make_cache):
    cache = make_cache()
    cache.register("a", array_loader(1))
    lease = cache.use("a")
    with pytest.raises(mc.ModelCacheError, match="not held"):
        lease.model
    lease.acquire()
    with pytest.raises(mc.ModelCacheError, match="already held"):
        lease.acquire()
    lease.release()
    lease.release()
    assert cache.info("a").leases == 0
    with pytest.raises(mc.ConfigError, match="timeout"):
        cache.use("a", timeout=-1).acquire()
