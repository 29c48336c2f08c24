"""Pushing a replica's residency to Ray Serve's controller as soon as it changes.

Ray pulls each replica's ``record_routing_stats`` every ``request_routing_stats_period_s``; a
model that just arrived on a device would wait that long to attract its requests. So a replica
also pushes its residency (and the ids on its devices, as its multiplexed model ids) when a model
moves, at most once every ``interval`` seconds, the way Ray's own ``@serve.multiplexed`` pushes the
ids it holds (every 0.1 s). The push uses the same controller call as Ray's multiplexing, which is
not public API: where it is missing, the replica logs so once and relies on the pulls.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

logger = logging.getLogger("modelcache.ray")

Push = Callable[[List[str], Dict[str, Any]], None]


def controller_push() -> Optional[Push]:
    """A function sending (multiplexed model ids, routing stats) for this replica to the Serve
    controller, or None (logged) outside a replica or where Ray lacks the call."""
    try:
        from ray import serve
        from ray.serve._private.common import RequestRoutingInfo
        from ray.serve.context import _get_global_client
        replica_id = serve.get_replica_context().replica_id
    except Exception as exc:        # ImportError on another Ray, RayServeException outside a replica
        logger.info("modelcache.ray: not pushing residency to the Serve controller (%s: %s); routers see it "
                    "when Ray pulls record_routing_stats", type(exc).__name__, exc)
        return None

    def push(model_ids: List[str], stats: Dict[str, Any]) -> None:
        client = _get_global_client()
        assert client is not None          # it raises rather than return None by default
        client.record_request_routing_info(
            RequestRoutingInfo(replica_id=replica_id, multiplexed_model_ids=model_ids, routing_stats=stats))
    return push


class Publisher:
    """Calls ``push(*compute())`` on a thread of its own after each :meth:`poke`, at most once every
    ``interval`` seconds, and only when what ``compute`` returns changed (``key`` of it)."""

    def __init__(self, compute: Callable[[], Tuple[List[str], Dict[str, Any]]], push: Push, interval: float,
                 key: Callable[[Tuple[List[str], Dict[str, Any]]], Any]) -> None:
        self._compute, self._push, self.interval, self._key = compute, push, interval, key
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._last: Any = None
        self.pushes = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="modelcache-ray-publisher", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Residency may have changed: push it soon."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stopped.is_set():
                return
            self._wake.clear()
            try:
                value = self._compute()
                key = self._key(value)
                if key != self._last:
                    self._push(*value)
                    self._last = key
                    self.pushes += 1
            except Exception as exc:    # the controller restarting, the cache closing...
                self.failures += 1
                if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                    logger.warning("modelcache.ray: pushing residency failed (%d time(s)): %s: %s", self.failures,
                                   type(exc).__name__, exc)
            if self._stopped.wait(self.interval):
                return

    def close(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


__all__ = ["Publisher", "controller_push"]
