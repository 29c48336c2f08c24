"""Where Ray Serve has no pluggable request router (Ray before 2.45: no ``ray.serve.request_router``),
``routing_options()`` falls back to Ray's default routing and logs so, once. Simulated here by
making that module unimportable. (The end-to-end fallback, a deployment routed by Ray's default
router from the ids modelcache reports, is in test_ray_serve.py.)"""
import logging
import sys

import pytest

pytest.importorskip("ray.serve")

import modelcache as mc  # noqa: E402
import modelcache.ray as mcray  # noqa: E402
from modelcache.ray import routing  # noqa: E402


@pytest.fixture
def no_router_api(monkeypatch):
    """``import ray.serve.request_router`` raises ImportError (as on an older Ray)."""
    monkeypatch.setitem(sys.modules, "ray.serve.request_router", None)
    monkeypatch.delitem(sys.modules, "modelcache.ray.router", raising=False)
    monkeypatch.setattr(routing, "_warned", {})
    yield
    sys.modules.pop("modelcache.ray.router", None)


def test_router_is_used_where_the_api_exists():
    from ray.serve.config import RequestRouterConfig
    options = mcray.routing_options(ttl=2.0, max_queue_skew=4, stats_period_s=0.5)
    config = options["request_router_config"]
    assert isinstance(config, RequestRouterConfig)
    assert config.get_request_router_class() is mcray.ModelCacheRouter
    assert config.request_router_kwargs == {"ttl": 2.0, "max_queue_skew": 4, "evict_steps": 1}
    assert config.request_routing_stats_period_s == 0.5
    router = object.__new__(mcray.ModelCacheRouter)      # what Ray does with request_router_kwargs
    router.initialize_state(**config.request_router_kwargs)
    assert (router._ttl, router._skew, router._evict_steps) == (2.0, 4, 1)
    with pytest.raises(mc.ConfigError, match=r"\['tll'\] are unknown"):
        router.initialize_state(tll=2.0)                  # a misspelt option fails loudly


def test_fallback_to_ray_routing_with_a_log_line(no_router_api, caplog):
    with caplog.at_level(logging.WARNING, logger="modelcache.ray"):
        assert mcray.router_class() is None
        assert mcray.routing_options() == {}
        assert mcray.routing_options() == {}
    lines = [r.getMessage() for r in caplog.records if r.name == "modelcache.ray"]
    assert len(lines) == 1, lines                      # said once
    assert "falling back to Ray's default routing" in lines[0]
    assert "request router" in lines[0]
    with pytest.raises(ImportError):
        mcray.ModelCacheRouter                          # noqa: B018  (the class itself needs the API)


def test_the_replica_side_does_not_need_the_router_api(no_router_api, make_cache):
    """A deployment's replicas work the same under the fallback: they report ids and residency."""
    import numpy as np
    cache = make_cache(device_budget=400)
    replica = mcray.ModelCacheReplica(lambda model_id: np.zeros(100, dtype=np.uint8), caches=[cache],
                                      push_interval=None)
    with replica.lease("m1") as model:
        assert model.nbytes == 100
    assert replica.multiplexed_model_ids() == ["m1"]
    assert replica.record_routing_stats()["models"] == {"m1": ["device", 100]}
    replica.close_model_caches()
