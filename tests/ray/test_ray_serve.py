"""modelcache inside Ray Serve, end to end on a local Ray (started once for this module): models
loaded by multiplexed model id through modelcache, residency reported, the router sending a
model's requests to the replica that holds it (on the device, or parked in host RAM), loads of
different models running at once, Ray never evicting what modelcache keeps, and Ray's default
routing (the fallback) working from the ids modelcache reports.

Models are numpy arrays (the python backend): model ``mK`` is 1000 bytes of int32s K + 1, so every
answer shows which model produced it."""
import asyncio
import collections
import os
import sys
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import modelcache.ray as mcray  # noqa: E402
from modelcache.ray import routing  # noqa: E402
from modelcache.ray.ranking import home_score  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NBYTES = 1000


class ArrayModels(mcray.ModelCacheReplica):
    """A replica whose model ``mK`` is an array of value K + 1; ``load_delay``: seconds each load
    takes (an async loader: others keep running meanwhile)."""

    def __init__(self, budget: int, load_delay: float = 0.0) -> None:
        self.calls: collections.Counter = collections.Counter()

        async def load(model_id: str) -> np.ndarray:
            self.calls[model_id] += 1
            if load_delay:
                await asyncio.sleep(load_delay)
            return np.full(NBYTES // 4, int(model_id[1:]) + 1, dtype=np.int32)

        super().__init__(load, simulated="1MiB", device_budget=budget, reserve=0, watch_interval=None)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def __call__(self, x: int) -> dict:
        lease = self.lease()
        async with lease as model:
            return {"y": int(model[0]) * x, "hit": bool(lease.hit), "replica": self.replica}

    async def place(self, model_id: str, tier: str) -> str:
        """Bring ``model_id`` to ``tier`` ("device" or "host") on this replica (whichever the call's
        own model id routed to)."""
        if tier == "device":
            async with self.lease(model_id):
                pass
        else:
            self.prepare([model_id])
        return self.replica

    def info(self) -> dict:
        return {"replica": self.replica, "calls": dict(self.calls), "ids": self.multiplexed_model_ids(),
                "stats": self.record_routing_stats(),
                "tiers": {e.name: str(e.tier) for e in self.model_cache.entries()}}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs and Serve; the workers import this module's classes by value and
    modelcache from this checkout."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")   # inherited by Ray's workers
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def deploy(name: str, replicas: int, budget: int, *, load_delay: float = 0.0, options=None):
    deployment = serve.deployment(ArrayModels).options(
        name=name, num_replicas=replicas, max_ongoing_requests=8, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=2, **(mcray.routing_options(stats_period_s=0.5) if options is None else options))
    return serve.run(deployment.bind(budget, load_delay), name=name, route_prefix=None)


def call(handle, model_id: str, x: int = 1) -> dict:
    return handle.options(multiplexed_model_id=model_id).remote(x).result(timeout_s=60)


def router_sees(handle, model_id: str, replica: str, tier: str) -> bool:
    """Whether the driver's router has ``replica``'s report of ``model_id`` on ``tier`` (a peek at
    Ray's internals, used only to wait; where they differ, it waits a second instead)."""
    try:
        replicas = list(handle._router._asyncio_router.request_router.curr_replicas.values())
    except AttributeError:
        time.sleep(1.0)
        return True
    for r in replicas:
        if r.replica_id.unique_id == replica:
            return r.routing_stats.get("models", {}).get(model_id, [None])[0] == tier
    return False


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def two_replicas(local_ray):
    """2 replicas, each with room for 3 models on its (simulated) device."""
    handle = deploy("routed", 2, 3 * NBYTES + 500)
    yield handle
    serve.delete("routed")


def replica_ids(handle) -> list:
    """Both replicas' ids (requests for many models reach both)."""
    seen = set()
    for k in range(40):
        seen.add(call(handle, f"m{100 + k}")["replica"])
        if len(seen) == 2:
            break
    assert len(seen) == 2
    return sorted(seen)


def test_models_load_by_multiplexed_id_through_modelcache(two_replicas):
    h = two_replicas
    for k in range(3):
        first = call(h, f"m{k}", x=2)
        assert first["y"] == 2 * (k + 1)                   # each model's own answer
        assert first["hit"] is False
        wait_until(lambda: call(h, f"m{k}")["hit"])        # then found on the device
    info = h.options(multiplexed_model_id="m0").info.remote().result()
    assert info["calls"]["m0"] == 1                        # loaded once through the cache's loader
    assert info["tiers"]["m0"] == "device"
    # a burst for a new model: one replica, one load
    responses = [h.options(multiplexed_model_id="m50").remote(3) for _ in range(6)]
    outs = [r.result(timeout_s=60) for r in responses]
    assert {o["y"] for o in outs} == {51 * 3}
    assert len({o["replica"] for o in outs}) == 1
    infos = [h.options(multiplexed_model_id=m).info.remote().result() for m in ("m50",)]
    assert infos[0]["calls"]["m50"] == 1
    with pytest.raises(Exception) as err:                  # no model id: a typed error naming the cause
        h.remote(1).result(timeout_s=60)
    assert "multiplexed model id" in str(err.value)


def test_residency_is_reported_as_routing_stats(two_replicas):
    h = two_replicas
    call(h, "m7")
    wait_until(lambda: call(h, "m7")["hit"])
    info = h.options(multiplexed_model_id="m7").info.remote().result()
    stats = info["stats"]
    assert stats["modelcache"] == 1
    assert stats["models"]["m7"] == ["device", NBYTES]
    assert stats["budget_bytes"] == 3 * NBYTES + 500
    assert 0 <= stats["free_bytes"] <= stats["budget_bytes"]
    assert stats["devices"][0]["simulated"] is True
    assert "m7" in info["ids"]                             # what it reports to Ray as its multiplexed ids
    assert mcray.Residency.from_stats(stats).rank("m7") == 0


def test_router_prefers_the_replica_holding_the_model(two_replicas):
    """A model put on the replica that is *not* its hash home (on the device, or parked in host RAM)
    draws its requests there: the router reads where models live."""
    h = two_replicas
    a, b = replica_ids(h)
    anchors = {}
    for k in range(200, 260):                              # a model whose requests go to each replica
        out = call(h, f"m{k}")
        anchors.setdefault(out["replica"], f"m{k}")
        if len(anchors) == 2:
            break
    checked = 0
    for k in range(300, 400):
        model = f"m{k}"
        home = max((a, b), key=lambda r: home_score(model, r))
        other = b if home == a else a
        tier = "device" if checked % 2 == 0 else "host"
        placed = h.options(multiplexed_model_id=anchors[other]).place.remote(model, tier).result(timeout_s=60)
        assert placed == other
        wait_until(lambda: router_sees(h, model, other, tier))     # its report reached the router
        outs = [call(h, model, x=1) for _ in range(4)]
        assert {o["replica"] for o in outs} == {other}, (tier, outs)
        assert outs[0]["hit"] is (tier == "device")
        assert outs[-1]["hit"] is True
        assert all(o["y"] == k + 1 for o in outs)
        checked += 1
        if checked == 4:
            break
    assert checked == 4


def test_loads_of_different_models_run_at_once_and_ray_evicts_nothing(local_ray):
    """One replica; each load takes 1 s: three models load in about 1 s, not 3, and one model asked
    for three times at once loads once. With room for 6 models, all 6 stay (Ray's own
    multiplexing would keep 3)."""
    h = deploy("slow", 1, 6 * NBYTES, load_delay=1.0)
    try:
        start = time.perf_counter()
        responses = [h.options(multiplexed_model_id=m).remote(1) for m in ("m1", "m2", "m3", "m1", "m1")]
        outs = [r.result(timeout_s=60) for r in responses]
        took = time.perf_counter() - start
        assert [o["y"] for o in outs] == [2, 3, 4, 2, 2]
        assert took < 2.2, f"three 1 s loads took {took:.2f} s: they queued behind each other"
        info = h.options(multiplexed_model_id="m1").info.remote().result()
        assert info["calls"] == {"m1": 1, "m2": 1, "m3": 1}
        for m in ("m4", "m5", "m6"):
            call(h, m)
        info = h.options(multiplexed_model_id="m1").info.remote().result()
        assert set(info["tiers"].values()) == {"device"} and len(info["tiers"]) == 6
        assert info["ids"] == ["m1", "m2", "m3", "m4", "m5", "m6"]
        assert all(call(h, f"m{k}")["hit"] for k in range(1, 7))
    finally:
        serve.delete("slow")


def test_fallback_to_rays_default_routing(local_ray, monkeypatch):
    """Without the router API (simulated), ``routing_options()`` gives ``{}``: Ray's default router
    routes by the multiplexed ids the replicas report, so a model's requests still find it."""
    monkeypatch.setitem(sys.modules, "ray.serve.request_router", None)
    monkeypatch.delitem(sys.modules, "modelcache.ray.router", raising=False)
    monkeypatch.setattr(routing, "_warned", {})
    options = mcray.routing_options()
    assert options == {}
    monkeypatch.undo()                                     # Serve itself needs the module back
    h = deploy("fallback", 2, 3 * NBYTES + 500, options=options)
    try:
        for k in range(3):
            first = call(h, f"m{k}", x=3)
            assert first["y"] == 3 * (k + 1)
            time.sleep(0.5)                                # the ids reach Ray's router
            outs = [call(h, f"m{k}") for _ in range(4)]
            assert {o["replica"] for o in outs} == {first["replica"]}
            assert all(o["hit"] for o in outs)
    finally:
        serve.delete("fallback")
