import asyncio
import os
import threading
import time

import numpy as np
import pytest

import modelcache as mc
from conftest import array_loader, run_threads


def tiers(cache):
    return {e.name: e.tier for e in cache.entries()}


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
        assert isinstance(err.value, TimeoutError)
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
    with pytest.raises(KeyError):
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


def test_explicit_evict_to_each_tier(make_cache, tmp_path):
    cache = make_cache(disk_dir=str(tmp_path / "disk"))
    calls = []
    cache.register("a", array_loader(5, calls=calls))
    with cache.use("a"):
        with pytest.raises(mc.ModelInUseError):
            cache.evict("a")
    info = cache.evict("a", tier=mc.Tier.DISK)
    assert info.tier is mc.Tier.DISK and info.host_bytes == 0 and os.path.exists(info.disk_path)
    with cache.use("a") as m:      # disk -> host -> device, no reload
        assert m[0] == 5 and m.nbytes == 100
    assert calls == [5] and cache.stats()["from_disk.count"] == 1
    cache.evict("a", tier=mc.Tier.UNLOADED)
    assert cache.info("a").tier is mc.Tier.UNLOADED
    with cache.use("a"):
        pass
    assert calls == [5, 5]
    with pytest.raises(mc.ConfigError):
        cache.evict("a", tier=mc.Tier.DEVICE)


def test_corrupt_disk_file_is_typed_and_recoverable(make_cache, tmp_path):
    cache = make_cache(disk_dir=str(tmp_path))
    cache.register("a", array_loader(5))
    cache.prefetch("a", tier=mc.Tier.HOST).result(5)
    path = cache.evict("a", tier=mc.Tier.DISK).disk_path
    with open(path, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        f.write(b"XXXXX")
    with pytest.raises(mc.CorruptFileError, match="sha256"):
        with cache.use("a"):
            pass
    assert cache.info("a").tier is mc.Tier.DISK
    cache.evict("a", tier=mc.Tier.UNLOADED)
    with cache.use("a") as m:   # reloaded by its loader
        assert m[0] == 5


def test_evict_to_disk_without_disk_dir(make_cache):
    cache = make_cache()
    cache.register("a", array_loader(1))
    with pytest.raises(mc.ConfigError, match="disk_dir"):
        cache.evict("a", tier=mc.Tier.DISK)


def test_host_budget_overflow_goes_to_disk_or_unloaded(make_cache, tmp_path):
    cache = make_cache(device_budget=100, host_budget=200, disk_dir=str(tmp_path))
    for i in range(5):
        cache.register(f"m{i}", array_loader(i))
        with cache.use(f"m{i}"):
            pass
    t = tiers(cache)
    assert t["m4"] is mc.Tier.DEVICE
    assert [t[f"m{i}"] for i in range(4)].count(mc.Tier.HOST) == 2
    assert [t[f"m{i}"] for i in range(4)].count(mc.Tier.DISK) == 2
    assert cache.stats()["host.bytes"] <= 200
    no_disk = make_cache(device_budget=100, host_budget=100, monitor=mc.SimulatedDevice(1000))
    for i in range(3):
        no_disk.register(f"m{i}", array_loader(i))
        with no_disk.use(f"m{i}"):
            pass
    assert tiers(no_disk)["m0"] is mc.Tier.UNLOADED


def test_pressure_from_another_process(make_cache, device):
    cache = make_cache(device_budget=600, reserve=200)
    for i in range(4):
        cache.register(f"m{i}", array_loader(i))
        with cache.use(f"m{i}"):
            pass
    assert cache.check_pressure() == 0
    other = device.take(450)            # free: 1000 - 400 - 450 = 150 < reserve 200
    with cache.use("m3"):
        assert cache.check_pressure() == 1          # one unleased model frees 100 -> 250 free
    assert device.free_bytes() >= 200
    assert tiers(cache)["m0"] is mc.Tier.HOST and cache.stats()["evictions.pressure"] == 1
    other.free()


def test_background_watcher_relieves_pressure(make_cache, device):
    cache = make_cache(device_budget=600, reserve=200, watch_interval=0.02)
    for i in range(3):
        cache.register(f"m{i}", array_loader(i))
        with cache.use(f"m{i}"):
            pass
    other = device.take(600)   # free 100 < 200
    deadline = time.monotonic() + 5
    while device.free_bytes() < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert device.free_bytes() >= 200
    assert cache.stats()["evictions.pressure"] >= 1
    other.free()


def test_reserve_blocks_loads_while_other_process_holds_memory(make_cache, device):
    cache = make_cache(device_budget=800, reserve=100)
    cache.register("a", array_loader(1))
    other = device.take(850)
    with pytest.raises(mc.DeviceBusyError, match="reserve"):
        with cache.use("a", timeout=0.1):
            pass
    other.free()
    with cache.use("a"):
        pass


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


def test_unregister_frees_everything(make_cache, device, tmp_path):
    cache = make_cache(disk_dir=str(tmp_path))
    cache.register("a", array_loader(1))
    cache.register("b", array_loader(2))
    with cache.use("a"):
        with pytest.raises(mc.ModelInUseError):
            cache.unregister("a")
    path = cache.evict("b", tier=mc.Tier.DISK).disk_path if cache.prefetch("b").result(5) else None
    cache.unregister("a")
    cache.unregister("b")
    assert len(cache) == 0 and device.process_bytes() == 0 and not os.path.exists(path)
    with pytest.raises(mc.ModelNotFoundError):
        cache.unregister("a")


def test_close_frees_and_refuses(device):
    with mc.ModelCache(monitor=device, device_budget=400, reserve=0) as cache:
        cache.register("a", array_loader(1))
        with cache.use("a"):
            pass
        assert device.process_bytes() == 100
    assert device.process_bytes() == 0
    with pytest.raises(mc.CacheClosedError):
        cache.use("a").acquire()
    cache.close()  # idempotent


def test_config_errors(device):
    with pytest.raises(mc.ConfigError, match="reserve"):
        mc.ModelCache(monitor=device, reserve=1000)
    with pytest.raises(mc.ConfigError, match="device_budget"):
        mc.ModelCache(monitor=device, device_budget=2000, reserve=0)
    with pytest.raises(mc.ConfigError, match="device=3"):
        mc.ModelCache(device=3, monitor=device)
    cache = mc.ModelCache(monitor=device, device_budget="50%", reserve="10%", watch_interval=None)
    assert (cache.device_budget_bytes, cache.reserve_bytes) == (500, 100)
    cache.close()
    cache = mc.ModelCache(monitor=device, reserve=100, watch_interval=None)
    assert cache.device_budget_bytes == 900      # total minus reserve
    cache.close()


def test_no_gpu_error_says_what_to_do():
    if _nvml_works():
        pytest.skip("this machine has a GPU")
    with pytest.raises(mc.MonitorError, match="SimulatedDevice"):
        mc.ModelCache()


def _nvml_works():
    try:
        mc.NvmlMonitor(0).close()
        return True
    except mc.MonitorError:
        return False


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


def parking_backend():
    """A python backend whose models keep 30 B on the device after eviction, like ONNX Runtime's
    weights mode keeps a session; ``unpark`` frees them."""
    from modelcache.backends.python import PythonBackend, PythonHandle

    class ParkingHandle(PythonHandle):
        def parked_device_bytes(self):
            return 30 if self.parked is not None else 0

        def kept_after_eviction(self):
            return 30

        def estimated_device_bytes(self):
            return self.nbytes + 30

    class ParkingBackend(PythonBackend):
        name = "parking"

        def _load_impl(self, name, value, options):
            handle = ParkingHandle(name, value, len(value))
            handle.parked = None
            return handle

        def _to_device_impl(self, handle):
            super()._to_device_impl(handle)
            if handle.parked is None:      # the "session", made on the first swap-in and kept
                handle.parked = self.context.monitor.allocate(30, owner=handle.name)
            handle.device_bytes = handle.nbytes + 30

        def _release_impl(self, handle):
            self._unpark_impl(handle)
            super()._release_impl(handle)

        def _unpark_impl(self, handle):
            if handle.parked is not None:
                handle.parked.free()
                handle.parked = None

    return ParkingBackend


def test_device_bytes_kept_by_parked_models_count_against_the_budget(device):
    ParkingBackend = parking_backend()
    cache = mc.ModelCache(monitor=device, device_budget=400, reserve=0, watch_interval=None)
    for i in range(6):
        cache.register(f"m{i}", b"x" * 100, backend=ParkingBackend)
    for round_ in range(3):
        for i in range(6):
            with cache.use(f"m{i}"):
                stats = cache.stats()
                assert stats["device.accounted_bytes"] <= 400
                assert stats["device.bytes"] == device.process_bytes() <= 400
    stats = cache.stats()
    on_device, parked = stats["models.device"], stats["models.host"]
    assert stats["device.parked_bytes"] == 30 * parked and stats["device.bytes"] == 130 * on_device + 30 * parked
    assert on_device == 2                  # 4 x 130 B would fit without the parked bytes; with them only 2
    cache.close()
    assert device.process_bytes() == 0


def test_underestimated_model_is_not_evicted_by_its_own_swap_in(device):
    """A backend measuring more than it estimated must not make the cache evict the model it is
    bringing in (that looped forever once)."""
    from modelcache.backends.python import PythonBackend

    class Grows(PythonBackend):
        name = "grows"

        def _to_device_impl(self, handle):
            super()._to_device_impl(handle)
            handle.device_bytes = handle.nbytes + 50      # estimated nbytes, measured more

    cache = mc.ModelCache(monitor=device, device_budget=250, reserve=0, watch_interval=None)
    for i in range(4):
        cache.register(f"m{i}", b"x" * 100, backend=Grows)
    done = []

    def run():
        for i in list(range(4)) * 2:
            with cache.use(f"m{i}", timeout=5):
                done.append(cache.info(f"m{i}").tier)
    t = threading.Thread(target=run)
    t.start()
    t.join(20)
    assert not t.is_alive() and done == [mc.Tier.DEVICE] * 8
    assert cache.stats()["device.accounted_bytes"] <= 250
    cache.close()


def test_parked_bytes_filling_the_budget_are_freed_for_a_swap_in(device):
    """Twelve parked models keep 360 of 400 B: the planner unparks some to bring one in."""
    backend = parking_backend()
    cache = mc.ModelCache(monitor=device, device_budget=400, reserve=0, watch_interval=None)
    for i in range(12):
        cache.register(f"m{i}", b"x" * 100, backend=backend)
    for i in list(range(12)) * 2:
        with cache.use(f"m{i}", timeout=1):
            stats = cache.stats()
            assert stats["device.accounted_bytes"] <= 400 and device.process_bytes() <= 400
    assert cache.stats()["unparks"] > 0
    cache.close()
    assert device.process_bytes() == 0


@pytest.mark.parametrize("limit", [1, 2])
def test_max_swap_ins_bounds_concurrent_swap_ins(limit):
    """With ``max_swap_ins``, no more swap-ins than that run at once (the others wait for a
    slot); without it, all of them overlap. Every request is still served."""
    from modelcache.backends.python import PythonBackend
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    class Counting(PythonBackend):
        name = "counting"

        def _to_device_impl(self, handle):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            time.sleep(0.05)
            with lock:
                state["now"] -= 1
            super()._to_device_impl(handle)

    def run(max_swap_ins):
        state.update(now=0, peak=0)
        with mc.ModelCache(monitor=mc.SimulatedDevice(10_000), device_budget=1000, reserve=0, watch_interval=None,
                           max_swap_ins=max_swap_ins) as cache:
            for i in range(6):
                cache.register(f"m{i}", array_loader(10), backend=Counting)
                cache.prefetch(f"m{i}", tier=mc.Tier.HOST).result()
            def use(name):
                with cache.use(name):
                    pass

            run_threads(use, [(f"m{i}",) for i in range(6)])
            assert cache.stats()["models.device"] == 6
        return state["peak"]

    assert run(limit) == limit
    assert run(None) == 6


def test_max_swap_ins_is_checked():
    with pytest.raises(mc.ConfigError, match="max_swap_ins=0"):
        mc.ModelCache(monitor=mc.SimulatedDevice(1000), max_swap_ins=0)


def test_simulated_link_is_shared_by_concurrent_copies():
    """SimulatedDevice.copy takes nbytes / bandwidth alone, and twice that when two copies share
    the link (lower bounds only: sleeps never end early)."""
    device = mc.SimulatedDevice(1000, link_bytes_per_s=100e6)
    start = time.perf_counter()
    device.copy(5_000_000)
    alone = time.perf_counter() - start
    took = []

    def copy():
        t0 = time.perf_counter()
        device.copy(5_000_000)
        took.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=copy) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert alone >= 0.05 and min(took) >= 0.095
    mc.SimulatedDevice(1000).copy(10**12)     # no link: free
