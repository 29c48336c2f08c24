"""modelcache inside Ray Serve (extra ``ray``: ``pip install 'modelcache[ray]'``).

- :class:`ModelCacheReplica`: the base class of a deployment whose replicas load models by
  multiplexed model id through a :class:`~modelcache.ModelCache` per GPU (a simulated device when
  there is none), instead of ``@serve.multiplexed``'s count-based LRU, and report where each model
  lives (device / loading / host / disk, with bytes and free room) as routing stats.
- :func:`routing_options`: deployment options selecting :class:`ModelCacheRouter` (ranks
  replicas for a model id: on the device, then parked in host RAM, then on disk, then where the
  fewest bytes would be evicted; ties by queue length). On a Ray without the pluggable router API
  it returns ``{}`` (Ray's default routing) and logs so.
- :func:`make_caches_for_replica`, :func:`replica_devices`, :func:`residency_stats`,
  :func:`rank_replicas`: the parts, for deployments that manage their caches themselves.

``import modelcache`` never imports this package, and importing this package does not import Ray
(its functions do, when called). ``ModelCacheRouter`` is imported from ``modelcache.ray.router``
(or as an attribute of this package), which needs Ray Serve's router API.
"""
from __future__ import annotations

from typing import Any

from .devices import DEFAULT_SIMULATED_TOTAL, make_caches_for_replica, replica_devices
from .errors import MissingModelIdError, ReplicaSetupError
from .ranking import rank_replicas, replica_keys
from .replica import ModelCacheReplica, ReplicaLease, current_model_id
from .residency import Residency, device_model_ids, residency_stats
from .routing import router_class, routing_options

__all__ = [
    "ModelCacheReplica", "ReplicaLease", "current_model_id",
    "routing_options", "router_class", "ModelCacheRouter",
    "make_caches_for_replica", "replica_devices", "DEFAULT_SIMULATED_TOTAL",
    "residency_stats", "device_model_ids", "Residency", "rank_replicas", "replica_keys",
    "MissingModelIdError", "ReplicaSetupError",
]


def __getattr__(name: str) -> Any:
    if name == "ModelCacheRouter":      # needs ray.serve.request_router: ImportError on an older Ray
        from .router import ModelCacheRouter
        return ModelCacheRouter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
