"""Choosing the router for a deployment: modelcache's (:class:`ModelCacheRouter`) where Ray Serve
has the pluggable router API, else Ray's default routing, with a log line saying so."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Type

from .._optional import require
from .ranking import DEFAULT_TTL, EVICT_STEPS

logger = logging.getLogger("modelcache.ray")

INSTALL = "pip install 'modelcache[ray]'"
#: seconds between Ray's pulls of each replica's ``record_routing_stats`` (replicas also push
#: their residency when it changes, every ``push_interval``: the pull is the backstop)
DEFAULT_STATS_PERIOD_S = 1.0
#: a replica whose queue is this much longer than the shortest counts after the others (None:
#: never; a replica whose queue is full is skipped anyway)
DEFAULT_MAX_QUEUE_SKEW: Optional[int] = None

_warned: Dict[str, bool] = {}


def router_class() -> Optional[Type[Any]]:
    """:class:`modelcache.ray.router.ModelCacheRouter`, or None (with a warning, once) when this Ray
    has no pluggable request router (``ray.serve.request_router``, Ray >= 2.45)."""
    require("ray.serve", "modelcache.ray", INSTALL)
    try:
        from .router import ModelCacheRouter
        _config_class()
    except ImportError as exc:
        if not _warned.get("router"):
            _warned["router"] = True
            logger.warning("modelcache.ray: Ray %s has no pluggable request router (%s); falling back to Ray's "
                           "default routing (by multiplexed model id, without modelcache's residency)",
                           _ray_version(), exc)
        return None
    return ModelCacheRouter


def routing_options(*, ttl: float = DEFAULT_TTL, max_queue_skew: Optional[int] = DEFAULT_MAX_QUEUE_SKEW,
                    evict_steps: Optional[int] = EVICT_STEPS, stats_period_s: float = DEFAULT_STATS_PERIOD_S,
                    stats_timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """Keyword arguments for ``@serve.deployment(...)`` or ``Deployment.options(...)`` that route
    requests with modelcache's router::

        @serve.deployment(num_replicas=4, max_ongoing_requests=16, **modelcache.ray.routing_options())
        class Models(modelcache.ray.ModelCacheReplica): ...

    ``ttl``: seconds a routing decision counts as the model being on its way to that replica;
    ``max_queue_skew``: a replica whose queue is that much longer than the shortest counts after
    all the others (None: off; a replica whose queue is full is skipped anyway); ``evict_steps``:
    evicted bytes are compared in these fractions of the model's size (1: fits or must evict;
    None: exact bytes);
    ``stats_period_s``: seconds between Ray's pulls of each replica's routing stats;
    ``stats_timeout_s``: how long Ray waits for them (None: 10 × the period, at least 10 s). On a
    Ray without the router API this returns ``{}`` (Ray's default routing) and logs a warning once.
    """
    cls = router_class()
    if cls is None:
        return {}
    timeout = stats_timeout_s if stats_timeout_s is not None else max(10.0, 10 * stats_period_s)
    fields: Dict[str, Any] = {"request_router_class": cls,
                              "request_router_kwargs": {"ttl": ttl, "max_queue_skew": max_queue_skew,
                                                        "evict_steps": evict_steps},
                              "request_routing_stats_period_s": stats_period_s,
                              "request_routing_stats_timeout_s": timeout}
    return {"request_router_config": _config_class()(**fields)}


def _config_class() -> Type[Any]:
    """Ray Serve's ``RequestRouterConfig`` (ImportError on a Ray without it)."""
    from ray.serve.config import RequestRouterConfig
    return RequestRouterConfig


def _ray_version() -> str:
    try:
        import ray
        return str(ray.__version__)
    except Exception:      # pragma: no cover
        return "(unknown version)"


__all__ = ["router_class", "routing_options", "DEFAULT_STATS_PERIOD_S"]
