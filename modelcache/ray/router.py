"""``ModelCacheRouter``: a Ray Serve request router that sends a request for a model id to the
replica whose modelcache holds it best (on the device, then in host RAM, then on disk, then where
bringing it in evicts the fewest bytes; ties by queue length). See ``ranking.py`` for the order and
``residency.py`` for what replicas report.

This module needs Ray Serve's pluggable router API (``ray.serve.request_router``, Ray >= 2.45):
importing it raises ImportError on an older Ray. Use :func:`modelcache.ray.routing_options`, which
falls back to Ray's default routing (with a log line) when the API is missing.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Tuple

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ..errors import ConfigError
from .ranking import DEFAULT_TTL, EVICT_STEPS, Sent, model_size, order_replicas
from .residency import Residency

logger = logging.getLogger("modelcache.ray")


class ModelCacheRouter(MultiplexMixin, RequestRouter):
    """Ranks replicas for a request's multiplexed model id by what their modelcaches report
    (``record_routing_stats`` and pushes from :class:`modelcache.ray.ModelCacheReplica`).

    A replica chosen for a request goes to that very request (Ray's default matching by request
    id; not ``FIFOMixin``, which hands it to the oldest waiting request, maybe for another model).

    Requests without a model id go to any replica (shortest queue). ``request_router_kwargs``:
    ``ttl`` (seconds a routing decision counts as the model being on its way to that replica's
    device, until the replica's own report shows it; default 1.0), ``max_queue_skew`` (a
    replica whose queue is that much longer than the shortest counts after all others; default
    None: off), ``evict_steps`` (evicted bytes compared in these fractions of the model's size;
    default 1: fits or must evict; None: exact bytes). Any other key raises ``ConfigError``.
    """

    def initialize_state(self, ttl: float = DEFAULT_TTL, max_queue_skew: Optional[int] = None,
                         evict_steps: Optional[int] = EVICT_STEPS, **kwargs: Any) -> None:
        if kwargs:
            raise ConfigError(f"request_router_kwargs {sorted(kwargs)} are unknown to ModelCacheRouter; it takes "
                              f"ttl, max_queue_skew and evict_steps (modelcache.ray.routing_options)")
        self._ttl = float(ttl)
        self._skew = max_queue_skew
        self._evict_steps = evict_steps
        self._sent: Sent = {}
        self._parsed: Dict[int, Tuple[Any, Optional[Residency]]] = {}   # id(stats) -> (stats, parsed)

    def _residency(self, stats: Any) -> Optional[Residency]:
        """``Residency.from_stats`` with a cache keyed by the stats object (they change only when
        Ray broadcasts new ones)."""
        key = id(stats)
        cached = self._parsed.get(key)
        if cached is not None and cached[0] is stats:
            return cached[1]
        parsed = Residency.from_stats(stats)
        if len(self._parsed) > 4 * max(1, len(self._replicas)) + 16:
            self._parsed.clear()
        self._parsed[key] = (stats, parsed)
        return parsed

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # back off between rounds when every ranked replica is full (Ray's mixins set this)
            pending_request.routing_context.should_backoff = True
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model_id:
            return [list(candidate_replicas)]
        cache = self.replica_queue_len_cache
        ordered = order_replicas(candidate_replicas, model_id, queue_lens={r.replica_id: cache.get(r.replica_id)
                                                                           for r in candidate_replicas},
                                 max_queue_skew=self._skew, sent=self._sent, ttl=self._ttl,
                                 evict_steps=self._evict_steps, parse=self._residency)
        first, (rank, _) = ordered[0]
        if rank != 0:       # the model goes there: its next requests follow before the replica reports it
            self._remember(model_id, first.replica_id)
        # one replica per rank: Ray takes the first whose queue is not full, so ties were broken
        # here (by queue length, then fewer models, then a fixed order) and the choice is known at once
        return [[replica] for replica, _ in ordered]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Remember where a model id went: until that replica reports it, later requests for the
        id go there too (and its free room counts the model as taken)."""
        model_id = pending_request.metadata.multiplexed_model_id
        if model_id:
            replica = self._replicas.get(replica_id)
            res = self._residency(replica.routing_stats) if replica is not None else None
            if res is None or res.rank(model_id) != 0:
                self._remember(model_id, replica_id)

    def _remember(self, model_id: str, replica_id: ReplicaID) -> None:
        nbytes = model_size(model_id, [self._residency(r.routing_stats) for r in self._replicas_list])
        self._sent.setdefault(replica_id, {})[model_id] = (time.time(), nbytes)
        if len(self._sent) > 2 * len(self._replicas) + 8:      # replicas gone since
            for gone in [r for r in self._sent if r not in self._replicas]:
                del self._sent[gone]


__all__ = ["ModelCacheRouter"]
