"""Eviction policies: which model gives way."""
import time

import pytest

import modelcache as mc
from conftest import array_loader, tiers


def test_lru_evicts_least_recently_used(make_cache):
    cache = make_cache(policy="lru")
    for i in range(4):
        cache.register(f"m{i}", array_loader(i))
        with cache.use(f"m{i}"):
            pass
    with cache.use("m0"):    # m0 is now the most recent; m1 the least
        pass
    cache.register("m4", array_loader(4))
    with cache.use("m4"):
        pass
    t = tiers(cache)
    assert t["m1"] is mc.Tier.HOST
    assert all(t[n] is mc.Tier.DEVICE for n in ("m0", "m2", "m3", "m4"))
    cache.register("m5", array_loader(5))
    with cache.use("m5"):
        pass
    assert tiers(cache)["m2"] is mc.Tier.HOST
    assert cache.stats()["evictions.room"] == 2


def test_lfu_evicts_least_frequently_used(make_cache):
    cache = make_cache(policy="lfu")
    for i, uses in enumerate([3, 1, 2, 5]):
        cache.register(f"m{i}", array_loader(i))
        for _ in range(uses):
            with cache.use(f"m{i}"):
                pass
    cache.register("new", array_loader(9))
    with cache.use("new"):
        pass
    assert tiers(cache)["m1"] is mc.Tier.HOST


def test_pinned_is_never_chosen(make_cache):
    cache = make_cache(device_budget=200)
    cache.register("pinned", array_loader(1), pinned=True)
    cache.register("x", array_loader(2))
    cache.register("y", array_loader(3))
    for name in ["pinned", "x", "y", "x", "y"]:
        with cache.use(name):
            pass
    assert cache.info("pinned").tier is mc.Tier.DEVICE and cache.info("pinned").pinned
    cache.evict("pinned")  # explicit eviction still works
    assert cache.info("pinned").tier is mc.Tier.HOST


def test_cost_policy_keeps_expensive_model():
    from modelcache.backends.python import PythonBackend

    class SlowToLoad(PythonBackend):
        """Swap-in cost proportional to the array's first value (ms)."""
        name = "slow"

        def _to_device_impl(self, handle):
            time.sleep(handle.obj[0] / 1000)
            super()._to_device_impl(handle)

    def run(policy):
        cache = mc.ModelCache(monitor=mc.SimulatedDevice(1000), device_budget=300, reserve=0,
                              watch_interval=None, policy=policy)
        cache.register("expensive", array_loader(60), backend=SlowToLoad)
        for i in range(6):
            cache.register(f"cheap{i}", array_loader(1), backend=SlowToLoad)
        with cache.use("expensive"):
            pass
        for _ in range(2):
            for i in range(6):
                with cache.use(f"cheap{i}"):
                    pass
        tier = cache.info("expensive").tier
        cache.close()
        return tier

    assert run("cost") is mc.Tier.DEVICE
    assert run("lru") is mc.Tier.HOST   # the same trace under LRU loses it


def test_custom_policy():
    class MostRecentFirst(mc.Policy):
        name = "mru"

        def rank(self, candidates):
            return sorted(candidates, key=lambda c: -c.last_used)

    cache = mc.ModelCache(monitor=mc.SimulatedDevice(1000), device_budget=200, reserve=0,
                          watch_interval=None, policy=MostRecentFirst())
    for name in "abc":
        cache.register(name, array_loader(1))
        with cache.use(name):
            pass
    assert tiers(cache) == {"a": mc.Tier.DEVICE, "b": mc.Tier.HOST, "c": mc.Tier.DEVICE}
    cache.close()
    with pytest.raises(mc.ConfigError, match="policy='nope'"):
        mc.ModelCache(monitor=mc.SimulatedDevice(1000), policy="nope")
