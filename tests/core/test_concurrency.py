import collections
import random
import threading
import time

import numpy as np
import pytest

import modelcache as mc
from conftest import array_loader, run_threads
from modelcache.backends.python import PythonBackend

MODEL_BYTES = 100


class LeaseCheckingBackend(PythonBackend):
    """Records a violation whenever a model leaves the device while the test holds a lease on it."""

    name = "lease-checking"
    held = collections.Counter()
    held_lock = threading.Lock()
    violations = []

    def _to_host_impl(self, handle):
        with self.held_lock:
            if self.held[handle.name] > 0:
                self.violations.append(("to_host", handle.name))
        super()._to_host_impl(handle)

    def _release_impl(self, handle):
        with self.held_lock:
            if self.held[handle.name] > 0:
                self.violations.append(("release", handle.name))
        super()._release_impl(handle)


@pytest.mark.parametrize("policy", ["lru", "lfu", "cost"])
def test_hammer_16_threads_20_models_budget_for_4(policy, tmp_path):
    LeaseCheckingBackend.held.clear()
    LeaseCheckingBackend.violations.clear()
    device = mc.SimulatedDevice(10_000)
    budget = 4 * MODEL_BYTES
    cache = mc.ModelCache(monitor=device, device_budget=budget, reserve=0, host_budget=10 * MODEL_BYTES,
                          disk_dir=str(tmp_path), policy=policy, watch_interval=0.005)
    for i in range(20):
        cache.register(f"m{i}", array_loader(i, MODEL_BYTES), backend=LeaseCheckingBackend)
    errors, over_budget, wrong = [], [], []
    done = collections.Counter()

    def check_budget():
        stats = cache.stats()
        if stats["device.accounted_bytes"] > budget or stats["device.bytes"] > budget:
            over_budget.append((stats["device.accounted_bytes"], stats["device.bytes"]))

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(150):
            i = min(int(rng.paretovariate(1.2)) - 1, 19) if rng.random() < 0.7 else rng.randrange(20)
            name = f"m{i}"
            try:
                with cache.use(name, timeout=20) as model:
                    with LeaseCheckingBackend.held_lock:
                        LeaseCheckingBackend.held[name] += 1
                    try:
                        if model[0] != i or model.nbytes != MODEL_BYTES:
                            wrong.append(name)
                        info = cache.info(name)
                        if info.tier is not mc.Tier.DEVICE or info.leases < 1:
                            wrong.append((name, info.tier))
                        time.sleep(rng.random() * 0.0005)
                    finally:
                        with LeaseCheckingBackend.held_lock:
                            LeaseCheckingBackend.held[name] -= 1
                done[seed] += 1
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(repr(exc))
            check_budget()
            if rng.random() < 0.03:
                try:
                    cache.evict(name, tier=rng.choice([mc.Tier.HOST, mc.Tier.DISK, mc.Tier.UNLOADED]), timeout=20)
                except mc.ModelInUseError:
                    pass
                check_budget()

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stats = cache.stats()
    cache.close()
    assert not errors, errors[:3]
    assert not wrong, wrong[:3]
    assert not over_budget, over_budget[:3]
    assert not LeaseCheckingBackend.violations, LeaseCheckingBackend.violations[:3]
    assert sum(done.values()) == 16 * 150
    assert device.peak_process_bytes <= budget and device.oom_count == 0
    assert stats["evictions"] > 0 and stats["hits"] > 0 and stats["leases.active"] == 0


def test_single_flight_16_users_one_load(make_cache):
    cache = make_cache()
    calls = []
    gate = threading.Event()

    def slow_loader():
        calls.append(1)
        gate.wait(5)
        return np.full(100, 42, np.uint8)

    cache.register("one", slow_loader)
    results = []

    def user():
        with cache.use("one", timeout=10) as model:
            results.append(int(model[0]))

    run_threads(user, [()] * 16, release=gate)
    assert calls == [1]
    assert results == [42] * 16
    info = cache.info("one")
    assert info.loads == 1 and info.misses + info.hits == 16


def test_single_flight_failure_reaches_every_waiter_once(make_cache):
    cache = make_cache()
    calls = []
    gate = threading.Event()

    def failing():
        calls.append(1)
        gate.wait(5)
        raise RuntimeError("bad weights")

    cache.register("bad", failing)
    errors = []

    def user():
        try:
            with cache.use("bad", timeout=10):
                pass
        except mc.LoaderError as exc:
            errors.append(exc)

    run_threads(user, [()] * 8, release=gate)
    assert calls == [1] and len(errors) == 8


def test_loads_of_different_models_run_concurrently(make_cache):
    cache = make_cache()
    barrier = threading.Barrier(2, timeout=5)

    def loader(value):
        def load():
            barrier.wait()    # only passes if both loaders run at the same time
            return np.full(100, value, np.uint8)
        return load

    cache.register("a", loader(1))
    cache.register("b", loader(2))
    out = {}

    def user(name):
        with cache.use(name, timeout=10) as model:
            out[name] = int(model[0])

    threads = [threading.Thread(target=user, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == {"a": 1, "b": 2}


def test_no_lock_held_while_loader_runs(make_cache):
    cache = make_cache()
    seen = []

    def introspective_loader():
        seen.append(cache.stats()["models"])       # would deadlock if the cache's lock were held
        seen.append(cache.info("self").moving_to)
        return np.zeros(100, np.uint8)

    cache.register("self", introspective_loader)
    t = threading.Thread(target=lambda: cache.use("self").acquire())
    t.start()
    t.join(5)
    assert not t.is_alive() and seen == [1, mc.Tier.HOST]


def test_lease_timeout_while_waiting_for_slow_load(make_cache):
    cache = make_cache()
    gate = threading.Event()
    cache.register("slow", lambda: (gate.wait(5), np.zeros(100, np.uint8))[1])
    first = threading.Thread(target=lambda: cache.use("slow", timeout=10).acquire())
    first.start()
    time.sleep(0.1)
    with pytest.raises(mc.LeaseTimeoutError, match="slow"):
        cache.use("slow", timeout=0.1).acquire()
    gate.set()
    first.join(5)


def test_victim_bytes_count_until_it_has_left_the_device():
    """A 300 B victim evicted for a 100 B model still holds 300 B until its eviction ends: a
    concurrent load must not allocate into that room meanwhile."""
    gate = threading.Event()
    evicting = threading.Event()

    class GatedBackend(PythonBackend):
        name = "gated"

        def _to_host_impl(self, handle):
            if handle.name == "V":
                evicting.set()
                gate.wait(5)
            super()._to_host_impl(handle)

    device = mc.SimulatedDevice(1000)
    cache = mc.ModelCache(monitor=device, device_budget=400, reserve=0, watch_interval=None)
    for name, size in [("V", 300), ("W", 100), ("X", 100), ("Y", 200)]:
        cache.register(name, array_loader(1, size), backend=GatedBackend)
    for name in ["V", "W"]:
        with cache.use(name):
            pass
    t1 = threading.Thread(target=lambda: cache.use("X", timeout=10).acquire())
    t1.start()
    assert evicting.wait(5)
    t2 = threading.Thread(target=lambda: cache.use("Y", timeout=10).acquire())
    t2.start()
    time.sleep(0.2)
    assert cache.info("Y").tier is not mc.Tier.DEVICE   # waits for room instead of over-committing
    gate.set()
    t1.join(5)
    t2.join(5)
    assert device.peak_process_bytes <= 400
    assert cache.info("X").tier is mc.Tier.DEVICE and cache.info("Y").tier is mc.Tier.DEVICE
    cache.close()
