"""``ModelCacheReplica``: the base class of a Ray Serve deployment whose replicas keep their models
in modelcache instead of ``@serve.multiplexed``'s count-based LRU.

Each replica holds one :class:`ModelCache` per GPU Ray gave it (a simulated device when it has
none), loads a request's model by its multiplexed model id through the cache (different models
load concurrently; one model loads once however many requests ask for it), and reports where each
model lives as its routing stats (``record_routing_stats``, pulled by Ray, and pushed as soon as a
model moves), with the ids on its devices as its multiplexed model ids. Ray never evicts anything:
modelcache decides by bytes, leases and memory readings.

    from ray import serve
    import modelcache.ray as mcray

    @serve.deployment(num_replicas=4, max_ongoing_requests=16, ray_actor_options={"num_gpus": 1},
                      **mcray.routing_options())
    class Models(mcray.ModelCacheReplica):
        def __init__(self, folder: str):
            super().__init__(lambda model_id: f"{folder}/{model_id}.onnx", backend="onnxruntime",
                             device_budget="70GiB")

        async def __call__(self, x):
            async with self.lease() as session:          # the request's multiplexed model id
                return await asyncio.to_thread(session.run, None, {"x": x})
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
from concurrent.futures import Future
from typing import (Any, Callable, Counter, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Set, Tuple, Type,
                    Union)

from .._optional import require
from ..backends import Backend
from ..cache import ModelCache
from ..decorators import DEFAULT_TIMEOUT, IdCheck
from ..devices import DeviceMonitor
from ..errors import ConfigError, ModelCacheError
from ..events import Event
from ..lease import Lease
from ..sizes import Size
from ..tiers import Tier
from .devices import DEFAULT_SIMULATED_TOTAL, make_caches_for_replica
from .errors import MissingModelIdError, ReplicaSetupError
from .publish import Publisher, controller_push
from .residency import device_room, device_model_ids, residency_stats
from .routing import INSTALL

logger = logging.getLogger("modelcache.ray")

#: seconds between pushes of a replica's residency to the Serve controller (as Ray's multiplexing)
DEFAULT_PUSH_INTERVAL = 0.1

_Default = Literal["default"]


class ReplicaLease:
    """A lease on a model of this replica (what :meth:`ModelCacheReplica.lease` returns): ``with``
    or ``async with`` gives the model, resident on the device while held. While it waits for its
    model, the replica reports the model as loading, so the router sends its other requests here."""

    __slots__ = ("replica", "model_id", "lease")

    def __init__(self, replica: "ModelCacheReplica", model_id: str, lease: Lease[Any]) -> None:
        self.replica, self.model_id, self.lease = replica, model_id, lease

    @property
    def hit(self) -> Optional[bool]:
        """After acquiring: True if the model was on the device when the request arrived."""
        return self.lease.hit

    @property
    def waited(self) -> bool:
        """After acquiring: True if it waited for room on the device."""
        return self.lease.waited

    def acquire(self) -> Any:
        with self._reported_loading():
            return self.lease.acquire()

    async def aacquire(self) -> Any:
        with self._reported_loading():
            return await self.lease.aacquire()

    @contextlib.contextmanager
    def _reported_loading(self) -> Iterator[None]:
        """While the lease is being acquired, the replica reports the model as loading here."""
        self.replica._begin(self.model_id)
        acquired = False
        try:
            yield
            acquired = True
        finally:
            self.replica._end(self.model_id, acquired)

    def release(self) -> None:
        self.lease.release()

    __enter__ = acquire
    __aenter__ = aacquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ReplicaLease({self.model_id!r}, held={self.lease.held})"


class ModelCacheReplica:
    """Base class for a Serve deployment whose replicas serve models by multiplexed model id
    through modelcache (see the module docstring for an example).

    Args:
        loader: ``loader(model_id)`` returns the model (a path, bytes, an object...; ``async def``
            works too), as for :meth:`ModelCache.multiplexed`.
        backend, size_hint, pinned, max_models, check_id: as for :meth:`ModelCache.multiplexed`
            (``max_models``: most ids registered at once per cache; None: no limit, the bytes
            decide).
        model_options: options for the backend (e.g. ``{"mode": "weights"}``).
        caches: the caches to use (default: :func:`make_caches_for_replica` with ``devices``,
            ``simulated`` and ``cache_kwargs``: one per GPU Ray gave the replica, or a simulated
            device of ``simulated`` bytes when it has none).
        push_interval: seconds between pushes of residency to the Serve controller, at most one
            each (None: never push; routers then see residency when Ray pulls
            ``record_routing_stats``).
        timeout: default seconds a request waits for its model (None: forever).
        cache_kwargs: :class:`ModelCache` arguments (``device_budget``, ``reserve``, ``host_budget``,
            ``disk_dir``, ``policy``, ``max_swap_ins``...).

    A subclass that defines ``__del__`` should call ``super().__del__()`` (it closes the caches).
    """

    def __init__(self, loader: Callable[[str], Any], *, backend: Union[str, Type[Backend]] = "auto",
                 size_hint: Optional[Size] = None, pinned: bool = False, max_models: Optional[int] = None,
                 check_id: IdCheck = None, model_options: Optional[Mapping[str, Any]] = None,
                 caches: Optional[Sequence[ModelCache]] = None, devices: Optional[Sequence[int]] = None,
                 simulated: Union[Size, Callable[[], DeviceMonitor]] = DEFAULT_SIMULATED_TOTAL,
                 push_interval: Optional[float] = DEFAULT_PUSH_INTERVAL, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 **cache_kwargs: Any) -> None:
        self._mc_lock = threading.Lock()
        self._mc_closed = False
        self._mc_publisher: Optional[Publisher] = None
        self._mc_hooks: List[Callable[[], None]] = []
        if caches is not None and cache_kwargs:
            raise ConfigError(f"caches= was given: the cache arguments {sorted(cache_kwargs)} would be ignored; "
                              f"pass them to the caches you make")
        self.model_caches: List[ModelCache] = list(caches) if caches is not None else \
            make_caches_for_replica(devices=devices, simulated=simulated, **cache_kwargs)
        if not self.model_caches:
            raise ReplicaSetupError("caches=[]: a replica needs at least one cache")
        self.lease_timeout = timeout
        options = dict(model_options or {})
        try:
            self._mc_loaders = [cache.multiplexed(backend=backend, size_hint=size_hint, pinned=pinned,
                                                  max_models=max_models, check_id=check_id, **options)(loader)
                                for cache in self.model_caches]
        except BaseException:
            if caches is None:          # made here: closed here (a bad argument must not leak them)
                self._close_caches(0)
            raise
        self._mc_where: Dict[str, int] = {}                     # model id -> index of its cache
        self._mc_loading: Counter[str] = collections.Counter()  # ids being acquired here now
        self._mc_sizes: Dict[str, int] = {}                     # device bytes measured at swap-ins
        self._mc_published: Set[str] = set()                    # ids last reported on a device
        for cache in self.model_caches:
            for kind in ("load", "swap_in", "eviction", "demotion", "error"):
                self._mc_hooks.append(cache.on(kind, self._on_event))
        push = controller_push() if push_interval is not None else None
        if push is not None:
            assert push_interval is not None
            self._mc_publisher = Publisher(self._routing_info, push, push_interval, key=_push_key)
            self._mc_publisher.poke()

    # ---------------------------------------------------------------- requests
    @property
    def model_cache(self) -> ModelCache:
        """The replica's (first) cache."""
        return self.model_caches[0]

    def lease(self, model_id: Optional[str] = None,
              timeout: Union[float, None, "_Default"] = "default") -> ReplicaLease:
        """A lease on ``model_id`` (default: the request's multiplexed model id); ``with`` or
        ``async with`` it to get the model, resident on the device while held. ``timeout``: seconds
        to wait for it (None: forever; default: the replica's ``timeout``)."""
        if model_id is None:
            model_id = current_model_id()
        if not model_id:
            raise MissingModelIdError("the request has no multiplexed model id: send it with "
                                      "handle.options(multiplexed_model_id=...) or the "
                                      "'serve_multiplexed_model_id' HTTP header")
        index = self._cache_for(model_id)
        try:
            inner = self._mc_loaders[index](model_id, self.lease_timeout if isinstance(timeout, str) else timeout)
        finally:
            self._placed(model_id)
        return ReplicaLease(self, model_id, inner)

    def prepare(self, model_ids: Sequence[str], *, swap_in: bool = False,
                timeout: Optional[float] = None) -> None:
        """Bring ``model_ids`` to host RAM now (ahead of their requests), as a service does at start;
        with ``swap_in``, also move each to the device once and back (the first swap-in prepares a
        model: ONNX Runtime's weights mode checks it against a plain session there)."""
        futures: List[Tuple[str, ModelCache, "Future[Any]"]] = []
        for model_id in model_ids:
            index = self._cache_for(model_id)
            try:
                self._mc_loaders[index](model_id)            # registers the id
            finally:
                self._placed(model_id)
            cache = self.model_caches[index]
            futures.append((model_id, cache, cache.prefetch(model_id, tier=Tier.HOST, timeout=timeout)))
        for model_id, cache, future in futures:
            future.result()
            if swap_in:
                with cache.use(model_id, timeout=timeout):
                    pass
                cache.evict(model_id, tier=Tier.HOST, timeout=timeout)
        self._poke()

    # ---------------------------------------------------------------- residency
    def residency(self) -> Dict[str, Any]:
        """This replica's routing stats: each model's tier and bytes, and the room left (see
        ``modelcache/ray/residency.py``)."""
        with self._mc_lock:
            loading = list(self._mc_loading)
            sizes = dict(self._mc_sizes)
        return residency_stats(self.model_caches, loading=loading, sizes=sizes)

    def record_routing_stats(self) -> Dict[str, Any]:
        """Ray Serve calls this every ``request_routing_stats_period_s``: the replica's residency."""
        return self.residency()

    def multiplexed_model_ids(self) -> List[str]:
        """The ids on this replica's devices (or loading to them): what it reports to Ray."""
        return device_model_ids(self.residency())

    def _routing_info(self) -> Tuple[List[str], Dict[str, Any]]:
        stats = self.residency()
        ids = device_model_ids(stats)
        with self._mc_lock:
            self._mc_published = set(ids)
        return ids, stats

    # ---------------------------------------------------------------- bookkeeping
    def _cache_for(self, model_id: str) -> int:
        """The index of the cache that holds (or will hold) ``model_id``: where it is registered,
        else the one with the most room (kept in ``_mc_where`` only until the id's loader call has
        registered it there, or refused it: see :meth:`_placed`)."""
        if len(self.model_caches) == 1:
            return 0
        for k, cache in enumerate(self.model_caches):
            if model_id in cache:
                return k
        with self._mc_lock:
            index = self._mc_where.get(model_id)
        if index is None:
            index = max(range(len(self.model_caches)), key=lambda k: device_room(self.model_caches[k]))
        with self._mc_lock:
            return self._mc_where.setdefault(model_id, index)

    def _placed(self, model_id: str) -> None:
        """``model_id``'s loader call is over: registered in its cache (which now says where it is)
        or refused (a bad id): the choice need not be kept."""
        if len(self.model_caches) > 1:
            with self._mc_lock:
                self._mc_where.pop(model_id, None)

    def _begin(self, model_id: str) -> None:
        with self._mc_lock:
            self._mc_loading[model_id] += 1
            known = model_id in self._mc_published
        if not known:
            self._poke()

    def _end(self, model_id: str, acquired: bool) -> None:
        with self._mc_lock:
            self._mc_loading[model_id] -= 1
            if self._mc_loading[model_id] <= 0:
                del self._mc_loading[model_id]
        if not acquired:
            self._poke()

    def _on_event(self, event: Event) -> None:
        if event.kind == "swap_in" and event.nbytes:
            with self._mc_lock:
                self._mc_sizes[event.model] = int(event.nbytes)
        self._poke()

    def _poke(self) -> None:
        if self._mc_publisher is not None:
            self._mc_publisher.poke()

    # ---------------------------------------------------------------- closing
    def close_model_caches(self, timeout: Optional[float] = 30.0) -> None:
        """Stop pushing residency and close the caches (drains leases for up to ``timeout`` s)."""
        with self._mc_lock:
            if self._mc_closed:
                return
            self._mc_closed = True
        if self._mc_publisher is not None:
            self._mc_publisher.close()
        for remove in self._mc_hooks:
            remove()
        self._close_caches(timeout)

    def _close_caches(self, timeout: Optional[float]) -> None:
        for cache in self.model_caches:
            try:
                cache.close(timeout)
            except ModelCacheError as exc:     # pragma: no cover (close does not raise for state)
                logger.warning("modelcache.ray: closing %r failed: %s", cache, exc)

    def __del__(self) -> None:
        """Serve calls this when the replica shuts down (graceful), and so does garbage collection."""
        if getattr(self, "model_caches", None) and not getattr(self, "_mc_closed", True):
            try:
                self.close_model_caches(timeout=10.0)
            except Exception:     # interpreter exit: modules may be gone
                pass


def current_model_id() -> str:
    """The multiplexed model id of the request being handled (``serve.get_multiplexed_model_id``);
    ``""`` when it has none."""
    serve = require("ray.serve", "modelcache.ray", INSTALL)
    return str(serve.get_multiplexed_model_id() or "")


def _push_key(value: Tuple[List[str], Dict[str, Any]]) -> Any:
    """What must change for a push: the ids, each model's tier and bytes, and the room in 1/64
    steps of the budget (readings of a real GPU move a little all the time)."""
    ids, stats = value
    step = max(1, int(stats.get("budget_bytes", 0)) // 64)
    models = tuple(sorted((k, v[0], v[1]) for k, v in stats.get("models", {}).items()))
    return tuple(ids), models, int(stats.get("free_bytes", 0)) // step


__all__ = ["ModelCacheReplica", "ReplicaLease", "current_model_id", "DEFAULT_PUSH_INTERVAL"]
