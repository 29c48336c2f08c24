import functools

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
