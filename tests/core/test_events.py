"""Events: hooks (``cache.on``) and log lines for loads, swap-ins, evictions, demotions and errors,
outside the cache's lock."""
import logging

import numpy as np
import pytest

import modelcache as mc
from conftest import array_loader


def test_hooks_see_every_kind_of_event_outside_the_lock(make_cache, tmp_path):
    cache = make_cache(device_budget=150, host_budget=150, disk_dir=str(tmp_path))
    events = []

    def hook(event):
        free = cache._cond.acquire(blocking=False)      # the cache's lock is not held during a hook
        if free:
            cache._cond.release()
        events.append((event.kind, event.model, event.source, event.target, event.nbytes, event.reason, free))
        assert event.seconds >= 0
    for kind in mc.EVENTS:
        cache.on(kind, hook)
    cache.register("a", array_loader(1, nbytes=100))
    cache.register("b", array_loader(2, nbytes=100))
    cache.register("bad", lambda: 1 / 0)
    with cache.use("a"):
        pass
    with cache.use("b"):                 # a leaves the device for room, then the host for b's bytes
        pass
    with pytest.raises(mc.LoaderError):
        with cache.use("bad"):
            pass
    cache.evict("b")
    assert all(free for *_, free in events), events
    kinds = [e[0] for e in events]
    assert ("load", "a", "unloaded", "host", 100, "", True) in events
    assert ("swap_in", "a", "host", "device", 100, "", True) in events
    assert ("eviction", "a", "device", "host", 100, "room", True) in events
    assert ("demotion", "a", "host", "disk", 100, "host", True) in events
    assert ("eviction", "b", "device", "host", 100, "explicit", True) in events
    assert kinds.count("error") == 1 and [e for e in events if e[0] == "error"][0][1] == "bad"
    with cache.use("a"):                 # read back from disk, then onto the device
        pass
    assert ("load", "a", "disk", "host", 100, "", True) in events
    assert ("swap_in", "a", "host", "device", 100, "", True) in events


def test_a_hook_that_raises_is_logged_and_the_request_served(make_cache, caplog):
    cache = make_cache()
    cache.register("a", array_loader(3))
    remove = cache.on("load", lambda event: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="modelcache"):
        with cache.use("a") as model:
            assert int(model[0]) == 3
    assert "hook raised" in caplog.text
    remove()
    calls = []
    cache.on("eviction", calls.append)
    cache.evict("a")
    assert len(calls) == 1 and calls[0].model == "a"


def test_hooks_are_checked(make_cache):
    cache = make_cache()
    with pytest.raises(mc.ConfigError, match="unknown; the events are load"):
        cache.on("loaded", print)
    with pytest.raises(mc.ConfigError, match="callable"):
        cache.on("load", "print")


def test_log_lines_name_the_model_the_bytes_and_the_time(make_cache, caplog):
    cache = make_cache(device_budget=150)
    cache.register("a", array_loader(1, nbytes=100))
    cache.register("b", lambda: np.zeros(100, np.uint8))
    with caplog.at_level(logging.INFO, logger="modelcache"):
        with cache.use("a"):
            pass
    assert "model 'a' loaded: 100 B on the host in" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="modelcache"):
        with cache.use("b"):
            pass
    lines = [r for r in caplog.records if r.name == "modelcache"]
    assert any("model 'a' evicted to the host (room): 100 B" in r.getMessage() and r.levelno == logging.DEBUG
               for r in lines)
    assert all("ms" in r.getMessage() or " s" in r.getMessage() for r in lines)
    caplog.clear()
    cache.register("bad", lambda: 1 / 0)
    with caplog.at_level(logging.INFO, logger="modelcache"):
        with pytest.raises(mc.LoaderError):
            with cache.use("bad"):
                pass
    assert any(r.levelno == logging.WARNING and "'bad'" in r.getMessage() and "ZeroDivisionError" in r.getMessage()
               for r in caplog.records)
