"""The router's order of replicas for a model id, with plain objects standing in for Ray's
replicas (no Ray needed): device, then host RAM, then disk, then fewest bytes evicted; recent
routing decisions; replicas without modelcache stats; a stable home per model; overload."""
from dataclasses import dataclass, field
from typing import Any, Dict, Set

import numpy as np
import pytest

import modelcache as mc
from modelcache.ray.ranking import home_score, model_size, order_replicas, rank_replicas, replica_keys
from modelcache.ray.residency import Residency, device_model_ids, residency_stats

MiB = 1 << 20


@dataclass
class FakeReplica:
    replica_id: str
    routing_stats: Dict[str, Any] = field(default_factory=dict)
    multiplexed_model_ids: Set[str] = field(default_factory=set)


def stats(models=None, free=0, budget=8 * MiB):
    return {"modelcache": 1, "models": {k: list(v) for k, v in (models or {}).items()}, "free_bytes": free,
            "budget_bytes": budget, "devices": []}


def ids(groups):
    return [[r.replica_id for r in group] for group in groups]


def test_device_then_host_then_disk_then_absent():
    replicas = [FakeReplica("absent", stats({"other": ("device", MiB)})),
                FakeReplica("disk", stats({"m": ("disk", MiB)})),
                FakeReplica("host", stats({"m": ("host", MiB)})),
                FakeReplica("device", stats({"m": ("device", MiB)}))]
    assert ids(rank_replicas(replicas, "m")) == [["device"], ["host"], ["disk"], ["absent"]]


def test_a_model_loading_counts_as_on_the_device():
    replicas = [FakeReplica("host", stats({"m": ("host", MiB)})), FakeReplica("loading", stats({"m": ("loading", 0)}))]
    assert ids(rank_replicas(replicas, "m")) == [["loading"], ["host"]]


def test_among_replicas_without_the_model_the_one_evicting_fewest_bytes_first():
    size = {"m": ("device", 4 * MiB)}           # its size, as a third replica reports it
    replicas = [FakeReplica("full", stats(free=0)), FakeReplica("roomy", stats(free=8 * MiB)),
                FakeReplica("half", stats(free=2 * MiB)), FakeReplica("holder", stats(size))]
    exact = dict(zip("full roomy half holder".split(), replica_keys(replicas, "m", evict_steps=None)))
    assert exact == {"holder": (0, 0), "roomy": (3, 0), "half": (3, 2 * MiB), "full": (3, 4 * MiB)}
    assert ids(rank_replicas(replicas, "m", evict_steps=None)) == [["holder"], ["roomy"], ["half"], ["full"]]
    quarters = dict(zip("full roomy half holder".split(), replica_keys(replicas, "m", evict_steps=4)))
    assert quarters == {"holder": (0, 0), "roomy": (3, 0), "half": (3, 2), "full": (3, 4)}
    # by default: fits in the free room, or must evict (whole models go: fragments do not decide)
    assert ids(rank_replicas(replicas, "m")) == [["holder"], ["roomy"], ["full", "half"]]


def test_evicted_bytes_order_parked_replicas_too():
    replicas = [FakeReplica("host-full", stats({"m": ("host", 2 * MiB)}, free=0)),
                FakeReplica("host-roomy", stats({"m": ("host", 2 * MiB)}, free=4 * MiB))]
    assert ids(rank_replicas(replicas, "m")) == [["host-roomy"], ["host-full"]]


def test_unknown_size_is_the_mean_reported_size():
    a = Residency.from_stats(stats({"x": ("device", 2 * MiB), "y": ("host", 4 * MiB)}))
    assert model_size("new", [a, None]) == 3 * MiB
    assert model_size("x", [a]) == 2 * MiB
    assert model_size("new", [None]) == 0


def test_recently_routed_model_counts_as_arriving_and_takes_room():
    replicas = [FakeReplica("a", stats(free=2 * MiB)), FakeReplica("b", stats(free=2 * MiB)),
                FakeReplica("c", stats({"n": ("host", 2 * MiB)}, free=0))]
    sent = {"b": {"m": (100.0, MiB)}}
    assert ids(rank_replicas(replicas, "m", sent=sent, now=100.5))[0] == ["b"]
    # another model (2 MiB): b's room is taken by m, which it has not reported yet
    assert replica_keys(replicas, "n", sent=sent, now=100.5, evict_steps=None) == [(3, 0), (3, MiB), (1, 2 * MiB)]
    assert replica_keys(replicas, "n", sent=sent, now=100.5) == [(3, 0), (3, 1), (1, 1)]
    # after the ttl the decision is forgotten
    assert replica_keys(replicas, "m", sent=sent, now=102.0, ttl=1.0)[:2] == [(3, 0), (3, 0)]
    assert sent == {"b": {}}


def test_replicas_without_modelcache_stats_use_the_ids_ray_knows():
    replicas = [FakeReplica("plain", {}, set()), FakeReplica("knows", {}, {"m"}),
                FakeReplica("cache", stats(free=8 * MiB))]
    assert ids(rank_replicas(replicas, "m"))[0] == ["knows"]
    assert replica_keys(replicas, "m")[0] == (3, 0)          # unknown size, unknown room


def test_equal_keys_go_to_fewer_models_then_a_fixed_order_per_model():
    replicas = [FakeReplica(f"r{k}", stats(free=0)) for k in range(4)]
    firsts = {}
    for model in ("a", "b", "c", "d", "e", "f", "g", "h"):
        order = [r.replica_id for r, _ in order_replicas(replicas, model)]
        assert order == [r.replica_id for r, _ in order_replicas(list(reversed(replicas)), model)]  # however listed
        assert order == sorted(order, key=lambda r: -home_score(model, r))
        firsts[model] = order[0]
    assert len(set(firsts.values())) > 1                  # models spread over replicas
    busy = [FakeReplica("many", stats({"x": ("device", MiB), "y": ("device", MiB)})),
            FakeReplica("few", stats({"z": ("device", MiB), "w": ("host", MiB)}))]
    assert [r.replica_id for r, _ in order_replicas(busy, "m")] == ["few", "many"]


def test_ties_by_queue_length_then_the_models_home():
    replicas = [FakeReplica(f"r{k}", stats({"m": ("device", MiB)} if k < 2 else {}, free=0)) for k in range(5)]
    lens = {"r0": 3, "r1": 1, "r2": 2, "r3": 0}          # r4: unknown, counted as 0
    order = [r.replica_id for r, _ in order_replicas(replicas, "m", queue_lens=lens)]
    assert order[:2] == ["r1", "r0"]                       # holders first, the shorter queue first
    home_first = sorted(["r3", "r4"], key=lambda r: -home_score("m", r))
    assert order[2:] == home_first + ["r2"]                # equal queues: the model's home first


def test_overloaded_replicas_go_last_only_when_asked():
    replicas = [FakeReplica("a", stats({"m": ("device", MiB)})), FakeReplica("b", stats()), FakeReplica("c", stats())]
    lens = {"a": 5, "b": 0, "c": 1}
    assert [r.replica_id for r, _ in order_replicas(replicas, "m", queue_lens=lens)][0] == "a"
    spilled = order_replicas(replicas, "m", queue_lens=lens, max_queue_skew=3)
    assert [r.replica_id for r, _ in spilled] == ["b", "c", "a"]
    assert [k for _, k in spilled] == [(3, 1), (3, 1), (0, 0)]
    assert [r.replica_id for r, _ in order_replicas(replicas, "m", queue_lens={"a": 2}, max_queue_skew=3)][0] == "a"


@pytest.mark.parametrize("bad", [None, {}, {"modelcache": 2}, {"modelcache": 1, "models": {"m": "device"}},
                                 {"modelcache": 1, "models": []}, "text"])
def test_malformed_stats_are_ignored(bad):
    assert Residency.from_stats(bad) is None


def test_residency_of_a_cache(make_cache):
    cache = make_cache(device_budget=250)
    for k in range(4):
        cache.register(f"m{k}", lambda k=k: np.full(100, k, dtype=np.uint8))
    for k in range(3):                                    # m0 is evicted to the host by m2
        with cache.use(f"m{k}"):
            pass
    out = residency_stats([cache], loading=["m3", "new"])
    assert out["models"] == {"m0": ["host", 100], "m1": ["device", 100], "m2": ["device", 100],
                             "m3": ["loading", 0], "new": ["loading", 0]}
    assert out["free_bytes"] == 50 and out["budget_bytes"] == 250
    assert out["devices"][0]["simulated"] is True
    assert device_model_ids(out) == ["m1", "m2", "m3", "new"]
    parsed = Residency.from_stats(out)
    assert parsed is not None and parsed.rank("m1") == 0 and parsed.rank("m0") == 1 and parsed.rank("zz") == 3
    assert parsed.nbytes("m1") == 100 and parsed.nbytes("m3") is None


def test_residency_reports_measured_bytes_of_parked_models(make_cache):
    cache = make_cache(device_budget=250)
    cache.register("m", lambda: np.zeros(100, dtype=np.uint8))
    with cache.use("m"):
        pass
    cache.evict("m")
    assert residency_stats([cache], sizes={"m": 120})["models"]["m"] == ["host", 120]
    cache.evict("m", tier=mc.Tier.UNLOADED)
    assert residency_stats([cache])["models"] == {}        # unloaded models are left out


def test_prefix_selects_and_strips():
    cache = mc.ModelCache(monitor=mc.SimulatedDevice(1000), device_budget=500, reserve=0, watch_interval=None)
    try:
        cache.register("x:a", lambda: np.zeros(10, dtype=np.uint8))
        cache.register("other", lambda: np.zeros(10, dtype=np.uint8))
        for name in ("x:a", "other"):
            with cache.use(name):
                pass
        assert residency_stats([cache], prefix="x:")["models"] == {"a": ["device", 10]}
    finally:
        cache.close()
