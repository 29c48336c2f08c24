"""Moves down the tiers: explicit evictions, the disk tier, the host budget, unregister and close."""
import logging
import os
import threading
import time

import pytest

import modelcache as mc
from conftest import array_loader, tiers


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


def test_a_damaged_disk_file_is_dropped_and_the_loader_runs_again(make_cache, tmp_path, caplog):
    """A byte flipped, the file truncated or deleted by a tmp cleaner: the next use drops it (a log
    line and info().last_error say so) and reloads through the loader."""
    calls = []
    cache = make_cache(disk_dir=str(tmp_path))
    cache.register("a", array_loader(5, calls=calls))
    for damage in ("flip", "truncate", "delete"):
        cache.prefetch("a", tier=mc.Tier.HOST).result(5)
        path = cache.evict("a", tier=mc.Tier.DISK).disk_path
        if damage == "flip":
            with open(path, "r+b") as f:
                f.seek(-5, os.SEEK_END)
                f.write(b"XXXXX")
        elif damage == "truncate":
            with open(path, "r+b") as f:
                f.truncate(10)
        else:
            os.unlink(path)
        with caplog.at_level("WARNING", logger="modelcache"):
            with cache.use("a") as m:          # no error: reloaded by its loader
                assert m[0] == 5
        info = cache.info("a")
        assert "disk-tier file dropped" in info.last_error and not os.path.exists(path)
        assert "cannot be read back" in caplog.text
    assert len(calls) == 4 and cache.stats()["errors.disk"] == 3


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


def test_close_drains_held_leases_then_frees(device, caplog):
    """close(timeout): new requests get CacheClosedError at once; a lease held meanwhile keeps a
    working model until its holder releases it; then the models are freed. Past the timeout a
    warning names the leases still held."""
    cache = mc.ModelCache(monitor=device, device_budget=400, reserve=0, watch_interval=None)
    cache.register("a", array_loader(1))
    cache.register("b", array_loader(2))
    holding, release, seen = threading.Event(), threading.Event(), []

    def holder():
        with cache.use("a") as model:
            holding.set()
            release.wait(5)
            seen.append(int(model.sum()))        # still the model's own bytes while closing
    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(5)
    closer = threading.Thread(target=cache.close, kwargs={"timeout": 10})
    start = time.monotonic()
    closer.start()
    while not cache._closed:
        time.sleep(0.001)
    for name in ("a", "b"):
        t0 = time.monotonic()
        with pytest.raises(mc.CacheClosedError):
            cache.use(name).acquire()
        assert time.monotonic() - t0 < 0.1        # at once, not after the drain
    time.sleep(0.2)
    assert closer.is_alive() and device.process_bytes() == 100     # waiting for the lease
    release.set()
    thread.join(5)
    closer.join(5)
    assert seen == [100] and not closer.is_alive() and time.monotonic() - start >= 0.2
    assert device.process_bytes() == 0

    cache = mc.ModelCache(monitor=device, device_budget=400, reserve=0, watch_interval=None)
    cache.register("kept", array_loader(3))
    lease = cache.use("kept")
    lease.acquire()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="modelcache"):
        cache.close(timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 2
    assert "'kept': 1" in caplog.text and "leases still held" in caplog.text
    lease.release()


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
