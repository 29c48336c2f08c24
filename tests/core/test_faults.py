"""Faults and misuse, as a careless or hostile user would cause them: nothing lost, nothing leaked,
every error typed (one test per promise of docs/reliability.md)."""
import gc
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import modelcache as mc
from conftest import array_loader, run_threads


def slow_loader(seconds, value=1, nbytes=100, started=None):
    def load():
        if started is not None:
            started.set()
        time.sleep(seconds)
        return np.full(nbytes, value, np.uint8)
    return load


# 1 ------------------------------------------------------------------------------------------------
def test_close_during_a_swap_in_leaks_nothing(device):
    """close(timeout) returns while a slow move is still running; the move frees what it makes."""
    from modelcache.backends.python import PythonBackend
    release = threading.Event()

    class SlowDevice(PythonBackend):
        name = "slow-device"

        def _to_device_impl(self, handle):
            release.wait(5)
            super()._to_device_impl(handle)

    cache = mc.ModelCache(monitor=device, device_budget=400, reserve=0, watch_interval=None)
    cache.register("a", np.ones(100, np.uint8), backend=SlowDevice)
    cache.prefetch("a", tier=mc.Tier.HOST).result(5)
    future = cache.prefetch("a")
    time.sleep(0.1)                          # the swap-in is under way
    start = time.monotonic()
    cache.close(timeout=0.3)
    assert time.monotonic() - start < 1.0
    release.set()
    with pytest.raises(mc.ModelCacheError):
        future.result(5)
    for _ in range(200):
        if device.process_bytes() == 0:
            break
        time.sleep(0.01)
    assert device.process_bytes() == 0       # the late swap-in's device bytes were freed


# 2 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["full", "read-only", "unpicklable"])
def test_a_failing_disk_tier_unloads_and_the_host_budget_holds(make_cache, tmp_path, failure, caplog,
                                                                monkeypatch):
    import errno
    import modelcache.backends.python as python_backend
    cache = make_cache(host_budget=300, disk_dir=str(tmp_path / "disk"))
    for i in range(10):
        value = (lambda: threading.Lock()) if failure == "unpicklable" else array_loader(i)
        cache.register(f"m{i}", value, size_hint=80 if failure == "unpicklable" else None)
    if failure != "unpicklable":
        code = errno.ENOSPC if failure == "full" else errno.EROFS

        def refuse(path, data):
            raise OSError(code, os.strerror(code), path)
        monkeypatch.setattr(python_backend, "atomic_write", refuse)
    with caplog.at_level(logging.WARNING, logger="modelcache"):
        for i in range(10):
            cache.prefetch(f"m{i}", tier=mc.Tier.HOST).result(5)
    stats = cache.stats()
    assert stats["host.bytes"] <= 300                 # the budget holds: unloaded instead
    assert stats["errors.disk"] > 0 and "unloaded instead" in caplog.text
    unloaded = [e for e in cache.entries() if e.tier is mc.Tier.UNLOADED]
    assert unloaded and all("disk tier failed" in e.last_error for e in unloaded)
    with cache.use(unloaded[0].name):                  # its loader brings it back
        pass


# 4, 5 -------------------------------------------------------------------------------------------
def test_two_caches_sharing_a_disk_dir_keep_apart(tmp_path):
    folder = str(tmp_path / "shared")
    device = mc.SimulatedDevice(10_000)
    with mc.ModelCache(monitor=device, reserve=0, disk_dir=folder, watch_interval=None) as a, \
            mc.ModelCache(monitor=device, reserve=0, disk_dir=folder, watch_interval=None) as b:
        for cache, value in ((a, 1), (b, 2)):
            cache.register("same-name", array_loader(value))
            cache.prefetch("same-name", tier=mc.Tier.HOST).result(5)
            cache.evict("same-name", tier=mc.Tier.DISK)
        assert a.info("same-name").disk_path != b.info("same-name").disk_path
        for cache, value in ((a, 1), (b, 2)):
            with cache.use("same-name") as model:
                assert model[0] == value and cache.info("same-name").loads == 1   # read back, not reloaded
    assert os.listdir(folder) == []          # each removed its own folder on close


def test_files_of_a_process_that_ended_without_close_are_reclaimed(tmp_path):
    """A process killed without close() leaves its disk folder; the next cache reclaims it. A
    process that exits normally without close() removes its files at exit."""
    folder = tmp_path / "disk"
    script = (
        "import numpy as np, os, sys, modelcache as mc\n"
        f"c = mc.ModelCache(monitor=mc.SimulatedDevice(10_000), reserve=0, disk_dir={str(folder)!r}, "
        "watch_interval=None)\n"
        "c.register('m', np.ones(100, np.uint8)); c.prefetch('m', tier=mc.Tier.HOST).result()\n"
        "print(c.evict('m', tier=mc.Tier.DISK).disk_path, flush=True)\n"
        "os._exit(0) if sys.argv[1] == 'kill' else None\n")
    killed = subprocess.run([sys.executable, "-c", script, "kill"], capture_output=True, text=True, check=True)
    left = killed.stdout.strip()
    assert os.path.exists(left)              # os._exit: no cleanup ran
    with mc.ModelCache(monitor=mc.SimulatedDevice(10_000), reserve=0, disk_dir=str(folder), watch_interval=None):
        assert not os.path.exists(os.path.dirname(left))      # reclaimed: its process is gone
    normal = subprocess.run([sys.executable, "-c", script, "exit"], capture_output=True, text=True, check=True)
    assert not os.path.exists(normal.stdout.strip())           # removed at interpreter exit


# 6 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("timeout", [None, 5.0])
def test_interrupts_propagate_and_leave_the_cache_consistent(make_cache, interrupt, timeout):
    cache = make_cache()
    calls = []

    def loader():
        calls.append(1)
        if len(calls) == 1:
            raise interrupt()
        return np.ones(100, np.uint8)

    cache.register("m", loader)
    with pytest.raises(interrupt):
        with cache.use("m", timeout=timeout):
            pass
    info = cache.info("m")
    assert info.tier is mc.Tier.UNLOADED and info.moving_to is None and info.leases == 0
    assert "interrupted" in info.last_error
    with cache.use("m") as model:            # the next request loads it
        assert model.sum() == 100


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("timeout", [None, 5.0])
def test_an_interrupt_in_a_move_propagates_and_the_model_serves_again(make_cache, monkeypatch, interrupt, timeout):
    """Ctrl-C (or SystemExit) during a swap-in, inside the backend's move: it reaches the caller
    (not wrapped as a ModelCacheError), the model is back on the host with nothing held or
    reserved, the device holds nothing for it, another model keeps serving, and the next request
    swaps it in."""
    from modelcache.backends.python import PythonBackend
    cache = make_cache()
    cache.register("m", array_loader(1, 100))
    cache.register("other", array_loader(2, 50))
    cache.prefetch("m", tier=mc.Tier.HOST).result()
    real = PythonBackend._to_device_impl
    calls = []

    def to_device(self, handle):
        calls.append(handle.name)
        if handle.name == "m" and calls.count("m") == 1:
            raise interrupt()
        return real(self, handle)
    monkeypatch.setattr(PythonBackend, "_to_device_impl", to_device)
    with pytest.raises(interrupt):
        with cache.use("m", timeout=timeout):
            pass
    info = cache.info("m")
    assert info.tier is mc.Tier.HOST and info.moving_to is None and info.leases == 0
    assert cache.stats()["device.accounted_bytes"] == 0
    with cache.use("other") as model:
        assert model.sum() == 2 * 50
    with cache.use("m") as model:               # the next request swaps it in
        assert model.sum() == 100 and cache.info("m").tier is mc.Tier.DEVICE


# 7 ------------------------------------------------------------------------------------------------
def test_a_timeout_is_a_promise(make_cache):
    """use(timeout=0.3) with a 3 s loader returns in time; the load finishes for the next request;
    close(timeout=0.3) returns in time although a prefetch's loader still runs."""
    cache = make_cache()
    cache.register("slow", slow_loader(1.5))
    start = time.monotonic()
    with pytest.raises(mc.LeaseTimeoutError, match="background"):
        with cache.use("slow", timeout=0.3):
            pass
    assert time.monotonic() - start < 0.6
    time.sleep(1.5)
    with cache.use("slow", timeout=0.3) as model:      # ready now: done in the background
        assert model[0] == 1
    assert cache.info("slow").loads == 1
    other = mc.ModelCache(monitor=mc.SimulatedDevice(1000), reserve=0, watch_interval=None)
    started = threading.Event()
    other.register("slow", slow_loader(3, started=started))
    other.prefetch("slow")
    started.wait(2)
    start = time.monotonic()
    other.close(timeout=0.3)
    assert time.monotonic() - start < 1.0


def test_moves_with_a_deadline_reuse_their_threads(make_cache):
    """A swap-in with a timeout runs on a worker thread; workers are reused, so per-thread state (a
    CUDA copy stream, a runtime's thread state) does not pile up over many evict/restore cycles
    (a thread per move left 0.5 MiB of device memory each on the H100). Idle workers end at close."""
    before = {t.ident for t in threading.enumerate()}
    cache = make_cache()
    cache.register("m", array_loader(1, nbytes=100))
    for _ in range(200):
        with cache.use("m", timeout=5) as model:
            assert int(model.sum()) == 100
        cache.evict("m")
    assert cache.stats()["swap_in.count"] >= 199
    assert cache._moves.workers.threads() == 1 and cache._moves.workers.busy() == 0
    cache.close()
    for _ in range(200):
        extra = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("modelcache-move")]
        if not extra:
            break
        time.sleep(0.01)
    assert not extra


def test_idle_workers_end_after_their_idle_time():
    from modelcache.moves import Workers
    workers = Workers("modelcache-test-workers", idle_s=0.05)
    ran = []
    for i in range(3):
        done = threading.Event()
        workers.start(lambda i=i, done=done: (ran.append(i), done.set()))
        assert done.wait(2)
        time.sleep(0.005)
    assert ran == [0, 1, 2] and workers.threads() == 1
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name.startswith("modelcache-test-workers")]
    done = threading.Event()
    workers.start(done.set)                  # a new thread after the idle one ended
    assert done.wait(2) and workers.threads() == 2
    workers.stop()



def test_bounded_workers_queue_jobs_in_order_beyond_their_threads():
    from modelcache.moves import Workers
    workers = Workers("modelcache-test-bounded", max_threads=2)
    gate, started, ran, running, most = threading.Event(), [], [], [0], [0]
    lock = threading.Lock()

    def job(i):
        with lock:
            started.append(i)
            running[0] += 1
            most[0] = max(most[0], running[0])
        gate.wait(5)
        with lock:
            running[0] -= 1
            ran.append(i)
    for i in range(8):
        workers.start(lambda i=i: job(i))
    time.sleep(0.1)
    assert workers.threads() == 2 and workers.busy() == 8     # six wait in line, none lost
    gate.set()
    for _ in range(200):
        if workers.busy() == 0:
            break
        time.sleep(0.01)
    assert workers.busy() == 0 and sorted(ran) == list(range(8)) and most[0] == 2
    assert started[2:] == list(range(2, 8))                   # those that waited started in the order they came
    assert workers.threads() == 2
    workers.stop()

# 8 ------------------------------------------------------------------------------------------------
def test_a_low_size_hint_plans_but_the_measured_size_counts():
    device_total = mc.SimulatedDevice(100_000)
    cache = mc.ModelCache(monitor=device_total, device_budget=10_000, reserve=0, watch_interval=None)
    for i in range(6):
        cache.register(f"m{i}", array_loader(i, nbytes=4000), size_hint=100)
        with cache.use(f"m{i}"):
            pass
    assert cache.stats()["device.bytes"] <= 10_000 and device_total.process_bytes() <= 10_000
    assert cache.info("m5").device_bytes == 4000
    cache.close()


# 9 ------------------------------------------------------------------------------------------------
def test_a_lease_is_thread_safe(make_cache):
    cache = make_cache()
    cache.register("m", array_loader(1))
    lease = cache.use("m")
    outcomes = []
    barrier = threading.Barrier(8)

    def grab():
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append("got")
        except mc.ModelCacheError:
            outcomes.append("refused")

    run_threads(grab, [()] * 8)
    assert outcomes.count("got") == 1 and cache.info("m").leases == 1
    run_threads(lease.release, [()] * 8)
    assert cache.info("m").leases == 0


def test_a_lease_dropped_without_release_is_released_with_a_warning(make_cache, caplog):
    cache = make_cache(device_budget=100)
    cache.register("a", array_loader(1))
    cache.register("b", array_loader(2))

    def forget():
        cache.use("a").acquire()             # never released: the Lease object is dropped
    with caplog.at_level(logging.WARNING, logger="modelcache"):
        forget()
        gc.collect()
    assert cache.info("a").leases == 0
    assert "'a'" in caplog.text and "test_faults.py" in caplog.text and "dropped without release" in caplog.text
    with cache.use("b", timeout=1):          # "a" no longer pins the device
        pass


# 10 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"device_budget": float("inf")}, "device_budget=inf"),
    ({"reserve": float("nan")}, "reserve=nan"),
    ({"watch_interval": -1}, "watch_interval=-1"),
    ({"watch_interval": "0.5"}, "watch_interval='0.5'"),
    ({"watch_interval": 1e-9}, "keep a core busy"),
    ({"prefetch_workers": "2"}, "prefetch_workers='2'"),
    ({"prefetch_workers": 0}, "prefetch_workers=0"),
    ({"max_swap_ins": 0}, "max_swap_ins=0"),
    ({"device": "0"}, "device='0'"),
    ({"disk_dir": 42}, "disk_dir=42"),
    ({"policy": "fifo"}, "policy='fifo'"),
])
def test_bad_configuration_is_refused_at_the_call(device, kwargs, words):
    kwargs = dict(kwargs)
    kwargs.setdefault("monitor", device)
    kwargs.setdefault("reserve", 0)
    with pytest.raises(mc.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        mc.ModelCache(**kwargs)


@pytest.mark.parametrize("bad", ["1", -1, float("nan"), True, [1]])
def test_bad_timeouts_are_refused_at_the_call(make_cache, bad):
    cache = make_cache()
    cache.register("m", array_loader(1))
    for call in (lambda: cache.use("m", timeout=bad), lambda: cache.prefetch("m", timeout=bad),
                 lambda: cache.evict("m", timeout=bad), lambda: cache.unregister("m", timeout=bad)):
        with pytest.raises(mc.ConfigError, match="timeout="):
            call()


# 11 ----------------------------------------------------------------------------------------------
def test_every_error_has_one_root_and_is_exported():
    import modelcache.errors as errors
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert getattr(mc, name) is cls and name in mc.__all__
        assert issubclass(cls, mc.ModelCacheError)
        builtins = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)]
        assert not builtins, f"{name} also derives from {builtins}"
    err = mc.ModelCacheError("the cause")
    err.model = "m"
    assert str(err) == "model 'm': the cause"       # named once the cache knows the model


# 12 ----------------------------------------------------------------------------------------------
def test_device_busy_names_pinned_models(make_cache):
    cache = make_cache(device_budget=200)
    cache.register("pinned", array_loader(1, nbytes=200), pinned=True)
    with cache.use("pinned"):
        pass
    cache.register("other", array_loader(2))
    with pytest.raises(mc.DeviceBusyError, match=r"leased: none; pinned: \['pinned'\]"):
        with cache.use("other", timeout=0.1):
            pass


# what already held, and must stay held ------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "\x00nul", "é" * 300, "CON", ".hidden"])
def test_hostile_names_stay_inside_the_disk_folder(make_cache, tmp_path, name):
    cache = make_cache(disk_dir=str(tmp_path / "disk"))
    cache.register(name, array_loader(3))
    cache.prefetch(name, tier=mc.Tier.HOST).result(5)
    path = cache.evict(name, tier=mc.Tier.DISK).disk_path
    assert os.path.realpath(path).startswith(os.path.realpath(cache._disk_space) + os.sep)
    with cache.use(name) as model:
        assert model[0] == 3


def test_chaos_sixteen_threads_nothing_wrong_nothing_stuck_nothing_left(tmp_path):
    """Loads that fail now and then, unregistering and re-registering, evictions to every tier and
    pressure from another process, all at once: every output right, no thread stuck, nothing left."""
    device = mc.SimulatedDevice(4000)
    rng = np.random.default_rng(0)
    flaky = {f"m{i}": rng.random() < 0.3 for i in range(12)}
    with mc.ModelCache(monitor=device, device_budget=1500, reserve=0, host_budget=2000,
                       disk_dir=str(tmp_path / "d"), watch_interval=0.01) as cache:
        def loader(i):
            def load():
                if flaky[f"m{i}"] and np.random.random() < 0.3:
                    raise IOError("flaky storage")
                return np.full(100 + 20 * i, i, np.uint8)
            return load
        for i in range(12):
            cache.register(f"m{i}", loader(i))
        wrong, stuck = [], []

        def worker(seed):
            r = np.random.default_rng(seed)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                i = int(r.integers(12))
                name, action = f"m{i}", r.random()
                try:
                    if action < 0.7:
                        with cache.use(name, timeout=2) as model:
                            if model[0] != i or model.nbytes != 100 + 20 * i:
                                wrong.append(name)
                    elif action < 0.85:
                        cache.evict(name, tier=[mc.Tier.HOST, mc.Tier.DISK, mc.Tier.UNLOADED][int(r.integers(3))],
                                    timeout=2)
                    elif action < 0.9:
                        other = device.take(int(r.integers(100, 800)))
                        time.sleep(0.01)
                        other.free()
                    else:
                        cache.prefetch(name, tier=mc.Tier.HOST, timeout=2)
                except (mc.LoaderError, mc.ModelInUseError, mc.LeaseTimeoutError, mc.DeviceOutOfMemoryError):
                    pass

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
            if t.is_alive():
                stuck.append(t.name)
        assert not wrong and not stuck
    assert device.process_bytes() == 0 and os.listdir(tmp_path / "d") == []
