"""Device memory accounting: other processes' pressure, the reserve, parked bytes, swap-ins in flight."""
import threading
import time

import pytest

import modelcache as mc
from conftest import array_loader, run_threads, tiers


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
    state = {"now": 0, "peak": 0, "expected": 0}
    lock = threading.Condition()

    class Counting(PythonBackend):
        name = "counting"

        def _to_device_impl(self, handle):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
                lock.notify_all()
                # as many as may overlap meet here (threads start late on a busy machine), then stay
                # a while: a swap-in past the limit would show meanwhile
                lock.wait_for(lambda: state["now"] >= state["expected"], timeout=2.0)
            time.sleep(0.05)
            with lock:
                state["now"] -= 1
            super()._to_device_impl(handle)

    def run(max_swap_ins):
        state.update(now=0, peak=0, expected=max_swap_ins or 6)
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


def test_what_runtimes_take_on_their_own_counts_against_the_budget(make_cache, device):
    """Memory this process's runtimes take beyond the books (kernel code, library state: on the
    H200, 80-160 MiB with 8 threads and sessions made again) is read from the device against a
    floor read right after the first swap-in, and counts against the budget: the cache evicts
    for it and plans swap-ins with it; when it goes, so does its count."""
    cache = make_cache(device_budget=400)
    for i in range(4):
        cache.register(f"m{i}", array_loader(i))
        with cache.use(f"m{i}"):
            pass
    assert cache._growth.floor is not None            # read after the first swap-in
    cache.check_pressure()
    assert cache.stats()["device.runtime_bytes"] == 0
    code = device.allocate(90, owner="kernel code")   # a runtime's own, outside the books
    for _ in range(2):
        cache.check_pressure()
        assert cache.stats()["device.runtime_bytes"] == 0    # the lowest of the last three readings
    assert cache.check_pressure() == 1                # 400 + 90 > 400: one model leaves for it
    stats = cache.stats()
    assert stats["device.runtime_bytes"] == 90 and stats["device.accounted_bytes"] == 300 + 90
    assert cache.accounted_bytes() == 300 + 90                # the same figure, read alone
    gone = next(n for n, t in tiers(cache).items() if t is mc.Tier.HOST)
    with cache.use(gone):                             # room planned with it: another one leaves
        assert sum(t is mc.Tier.DEVICE for t in tiers(cache).values()) == 3
        assert device.process_bytes() <= 400
    code.free()
    for _ in range(3):
        cache.check_pressure()
    assert cache.stats()["device.runtime_bytes"] == 0     # gone: it counts no more


def test_the_memory_of_a_move_in_flight_is_not_growth(make_cache, device):
    """A swap-in's memory on its way is within the room promised to it: readings then are taken
    against books that include that room."""
    cache = make_cache(device_budget=400)
    cache.register("m0", array_loader(0))
    with cache.use("m0"):
        pass
    cache.check_pressure()
    extra = device.allocate(100, owner="in flight")
    cache._ledger.reservations.append(mc.ledger.Reservation(cache._entries["m0"], 100, []))
    for _ in range(3):
        cache._measure_growth()
    assert cache._ledger.runtime_bytes == 0           # within the promised room: not growth
    cache._ledger.reservations.clear()
    extra.free()


def test_another_cache_on_the_device_is_not_runtime_growth(device):
    """Two caches of one process on one device: each one's models are not the other's growth."""
    a = mc.ModelCache(monitor=device, device_budget=400, reserve=0, watch_interval=None)
    b = mc.ModelCache(monitor=device, device_budget=400, reserve=0, watch_interval=None)
    try:
        for cache, prefix in ((a, "a"), (b, "b")):
            for i in range(3):
                cache.register(f"{prefix}{i}", array_loader(i))
        with a.use("a0"):
            pass
        for i in range(3):
            with b.use(f"b{i}"):
                pass
        for i in (1, 2):
            with a.use(f"a{i}"):
                pass
        for _ in range(3):
            assert a.check_pressure() == 0 and b.check_pressure() == 0
        assert a.stats()["device.runtime_bytes"] == b.stats()["device.runtime_bytes"] == 0
    finally:
        a.close()
        b.close()


def test_runtime_growth_never_keeps_a_model_that_fits_the_budget_out(make_cache, device):
    """Growth counts against the budget only as far as it leaves room for the model being brought
    in alone, and at most a quarter of the budget; a reading of 0 (NVML does not list this
    process) is no reading."""
    cache = make_cache(device_budget=400)
    cache.register("small", array_loader(0, nbytes=100))
    cache.register("big", array_loader(1, nbytes=350))
    with cache.use("small"):
        pass
    assert cache._growth.floor is not None
    code = device.allocate(300, owner="kernel code")
    for _ in range(3):
        cache.check_pressure()
    assert cache.stats()["device.runtime_bytes"] == 100           # capped: a quarter of the budget
    with cache.use("big", timeout=5):                              # 350 + 100 > 400, yet it fits alone
        assert cache.info("small").tier is mc.Tier.HOST
    code.free()
    real = device.process_bytes
    device.process_bytes = lambda pid=None: 0
    try:
        for _ in range(3):
            cache.check_pressure()
        assert cache.stats()["device.runtime_bytes"] == 100        # unchanged: no reading
    finally:
        device.process_bytes = real
