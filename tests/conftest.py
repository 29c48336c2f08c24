import functools
import json
import os
import threading
import time

import numpy as np
import pytest

import modelcache as mc


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    try:
        monitor = mc.NvmlMonitor(0)
    except mc.MonitorError:
        return False
    monitor.close()
    return True


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with NVML (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return mc.SimulatedDevice(1000)


@pytest.fixture
def make_cache(device, tmp_path):
    """A cache on a 1000-byte simulated device; keyword arguments override the defaults."""
    caches = []

    def make(**kwargs):
        kwargs.setdefault("monitor", device)
        kwargs.setdefault("device_budget", 400)
        kwargs.setdefault("reserve", 0)
        kwargs.setdefault("watch_interval", None)
        cache = mc.ModelCache(**kwargs)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


def array_loader(value: int, nbytes: int = 100, calls=None):
    """A loader returning an array of ``nbytes`` bytes filled with ``value``."""
    def load():
        if calls is not None:
            calls.append(value)
        return np.full(nbytes, value, dtype=np.uint8)
    return load


def tiers(cache):
    """Each model's tier."""
    return {e.name: e.tier for e in cache.entries()}


def run_threads(target, args_list, release=None, settle=0.2, timeout=10):
    """Run ``target(*args)`` for each tuple in ``args_list`` on threads of their own; with
    ``release`` (an Event), set it ``settle`` seconds after they start; join them all."""
    threads = [threading.Thread(target=target, args=args) for args in args_list]
    for t in threads:
        t.start()
    if release is not None:
        time.sleep(settle)
        release.set()
    for t in threads:
        t.join(timeout)


def record(name, data):
    """Print a GPU test's figures; with ``MODELCACHE_RESULTS_DIR`` set, also write them there as
    ``NAME.json`` (the dated results under docs/ come from it)."""
    folder = os.environ.get("MODELCACHE_RESULTS_DIR")
    print(name, json.dumps(data))
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=2)
