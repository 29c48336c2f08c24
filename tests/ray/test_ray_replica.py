"""The replica side without starting Ray: leases by model id, the "loading" state reported while a
model is on its way, several caches (a replica holding several GPUs), pushes only when residency
changes, and argument errors that name the cause."""
import threading
import time

import numpy as np
import pytest

import modelcache as mc
import modelcache.ray as mcray
from modelcache.ray.publish import Publisher


def replica(caches, loader=None, **kwargs):
    kwargs.setdefault("push_interval", None)
    return mcray.ModelCacheReplica(loader or (lambda model_id: np.full(100, int(model_id[1:]), dtype=np.uint8)),
                                   caches=caches, **kwargs)


def test_a_model_on_its_way_is_reported_as_loading(make_cache):
    release = threading.Event()

    def slow(model_id):
        release.wait(10)
        return np.zeros(100, dtype=np.uint8)

    r = replica([make_cache(device_budget=400)], slow)
    done = []
    t = threading.Thread(target=lambda: done.append(r.lease("m1").__enter__()))
    t.start()
    deadline = time.monotonic() + 5
    while r.residency()["models"].get("m1", [None])[0] != "loading":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert r.multiplexed_model_ids() == ["m1"]             # reported to Ray as on its way here
    release.set()
    t.join(5)
    assert done and r.residency()["models"]["m1"] == ["device", 100]
    r.close_model_caches()


def test_leases_by_id_and_errors_name_the_cause(make_cache):
    cache = make_cache(device_budget=400)
    r = replica([cache])
    with r.lease("m7") as model:
        assert int(model[0]) == 7
    lease = r.lease("m7")
    with lease:
        assert lease.hit is True
    with pytest.raises(mcray.MissingModelIdError, match="multiplexed model id"):
        r.lease()                                          # not in a request: no model id
    with pytest.raises(mc.ConfigError, match="refused by the id check"):
        r.lease("../etc")
    with pytest.raises(mc.ConfigError, match="would be ignored"):
        replica([cache], device_budget=100)
    with pytest.raises(mcray.ReplicaSetupError):
        replica([])
    r.close_model_caches()
    r.close_model_caches()                                 # idempotent


def test_several_caches_new_ids_go_where_there_is_room():
    caches = [mc.ModelCache(monitor=mc.SimulatedDevice(1000, device=k), device_budget=300, reserve=0,
                            watch_interval=None) for k in range(2)]
    r = replica(caches)
    for k in range(4):
        with r.lease(f"m{k}"):
            pass
    where = {name: k for k, cache in enumerate(caches) for name in (e.name for e in cache.entries())}
    assert sorted(where) == ["m0", "m1", "m2", "m3"]
    assert sorted(where.values()) == [0, 0, 1, 1]          # spread by room
    stats = r.residency()
    assert stats["budget_bytes"] == 600 and len(stats["devices"]) == 2
    assert {d["device"] for d in stats["devices"]} == {0, 1}
    with r.lease("m0"):                                     # an id stays in its cache
        pass
    assert "m0" in caches[where["m0"]] and "m0" not in caches[1 - where["m0"]]
    for k in range(50):                                     # ids the check refuses leave nothing behind
        with pytest.raises(mc.ConfigError):
            r.lease(f"../x{k}")
    assert r._mc_where == {}                                # placements are kept only until registered
    r.close_model_caches()
    assert all(c._closed for c in caches)


def test_publisher_pushes_when_residency_changes_at_most_every_interval():
    state = {"models": {"a": ["device", 1]}}
    pushed = []
    p = Publisher(lambda: (sorted(state["models"]), dict(state)), lambda ids, stats: pushed.append(ids), 0.05,
                  key=lambda value: tuple(value[0]))
    try:
        for _ in range(5):
            p.poke()
            time.sleep(0.02)
        time.sleep(0.1)
        assert pushed == [["a"]]                            # unchanged: pushed once
        start, k = time.monotonic(), 0
        while time.monotonic() - start < 0.4:               # changing all the time, poked every 5 ms
            k += 1
            state["models"] = {"a": ["device", 1], f"b{k}": ["device", 1]}
            p.poke()
            time.sleep(0.005)
        elapsed = time.monotonic() - start
        time.sleep(0.1)
        assert 3 <= len(pushed) - 1 <= elapsed / 0.05 + 2  # changes pushed, at most one per interval
    finally:
        p.close()


def test_a_push_waits_for_a_change_of_residency_not_of_every_reading():
    """Free room moves a little with every reading of a real GPU: it counts in 1/64 steps of the budget."""
    from modelcache.ray.replica import _push_key
    stats = {"models": {"a": ["device", 100]}, "free_bytes": 60_000, "budget_bytes": 640_000}
    base = _push_key((["a"], stats))
    assert _push_key((["a"], dict(stats, free_bytes=60_000 + 9_000))) == base          # < budget/64
    assert _push_key((["a"], dict(stats, free_bytes=60_000 + 11_000))) != base         # > budget/64
    assert _push_key((["a"], dict(stats, models={"a": ["host", 100]}))) != base         # a tier moved
    assert _push_key((["a", "b"], stats)) != base


def test_publisher_survives_a_failing_push(caplog):
    calls = []

    def push(ids, stats):
        calls.append(1)
        raise RuntimeError("controller restarting")

    p = Publisher(lambda: (["a"], {}), push, 0.01, key=lambda value: value)
    try:
        p.poke()
        deadline = time.monotonic() + 2
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.05)
        assert p.failures >= 1 and p.pushes == 0
        p.poke()                                            # tries again
        while len(calls) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        p.close()
    assert any("pushing residency failed" in r.getMessage() for r in caplog.records)


def test_outside_ray_a_replica_has_no_gpu_and_starts_no_ray():
    """``replica_devices()`` outside a Ray worker: no GPU assigned, and no local Ray started
    (``ray.get_gpu_ids()`` alone would start one)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():                               # pragma: no cover (another module's Ray)
        pytest.skip("Ray is running in this process")
    assert mcray.replica_devices() == []
    caches = mcray.make_caches_for_replica(simulated="1MiB", device_budget=400, reserve=0, watch_interval=None)
    try:
        assert len(caches) == 1 and caches[0].monitor.simulated
    finally:
        for cache in caches:
            cache.close()
    assert not ray.is_initialized()
