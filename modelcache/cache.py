"""The cache: registered models, their tiers, leases, and the room-making that keeps the device
within budget.

A request's path, top to bottom in this file: ``use()`` returns a :class:`Lease`; entering it
calls ``_acquire()``, which either finds the model resident (a hit) or makes it resident
(``_step_up`` from disk/unloaded to the host, then ``_plan_swap_in`` + ``_swap_in`` onto the
device, evicting victims first); the caller runs the model; leaving the lease calls
``_release()``.

Locking: one condition variable guards all entries. It is never held while a loader runs or a
backend moves bytes; an entry with a move in flight carries a Future (``entry.moving``) that
other requests for it wait on, so one model is loaded once however many ask for it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import (Any, AsyncIterator, Callable, Dict, List, Optional, Tuple,
                    Type, Union)

from .backends import Backend, BackendContext, Handle, backend_class, detect_backend
from .errors import (BackendError, CacheClosedError, ConfigError, DeviceBusyError, DuplicateModelError,
                     LeaseTimeoutError, LoaderError, ModelCacheError, ModelInUseError, ModelNotFoundError,
                     ModelTooLargeError, MonitorError)
from .monitors import DeviceMonitor, HostMonitor, NvmlMonitor
from .policies import Candidate, Policy, make_policy
from .sizes import Size, format_bytes, parse_size
from .stats import Recorder
from .tiers import EntryInfo, Tier

logger = logging.getLogger("modelcache")

_DEFAULT_TIMEOUT = 30.0
LIVE_CACHES: "weakref.WeakSet[ModelCache]" = weakref.WeakSet()   # for `modelcache.status`


class _Entry:
    """A registered model. Fields are read and written with the cache's lock held."""

    __slots__ = ("name", "loader", "backend_spec", "backend", "options", "pinned", "owner", "handle",
                 "tier", "moving", "moving_to", "evicting_for", "leases", "hits", "misses", "loads",
                 "uses", "tick", "last_used", "swap_in_seconds", "load_seconds", "last_error", "removed",
                 "unpark_after")

    def __init__(self, name: str, loader: Any, backend_spec: Any, options: Dict[str, Any],
                 pinned: bool, owner: Any) -> None:
        self.name = name
        self.loader = loader
        self.backend_spec = backend_spec
        self.backend: Optional[Backend] = None
        self.options = options
        self.pinned = pinned
        self.owner = owner
        self.handle: Optional[Handle] = None
        self.tier = Tier.UNLOADED
        self.moving: Optional[Future] = None
        self.moving_to: Optional[Tier] = None
        self.evicting_for: Optional[_Reservation] = None
        self.leases = self.hits = self.misses = self.loads = self.uses = self.tick = 0
        self.last_used: Optional[float] = None
        self.swap_in_seconds: Optional[float] = None
        self.load_seconds: Optional[float] = None
        self.last_error: Optional[str] = None
        self.removed = False
        self.unpark_after = False    # a victim whose kept device bytes go too (planner's choice)

    @property
    def device_bytes(self) -> int:
        return self.handle.device_bytes if self.handle is not None else 0

    @property
    def host_bytes(self) -> int:
        return self.handle.host_bytes if self.handle is not None else 0

    @property
    def parked_bytes(self) -> int:
        """Device bytes held while off the device tier."""
        if self.handle is None or self.tier is Tier.DEVICE:
            return 0
        return self.handle.parked_device_bytes()

    @property
    def unpark_frees(self) -> int:
        """Device bytes unparking would free (parked bytes may be shared with other models)."""
        if self.handle is None or self.tier is not Tier.HOST:
            return 0
        return self.handle.unpark_frees_bytes()

    @property
    def freed_by_eviction(self) -> int:
        """Device bytes a move to the host tier frees."""
        return self.device_bytes - (self.handle.kept_after_eviction() if self.handle is not None else 0)

    def need(self) -> Optional[int]:
        """Device bytes this model will add when it moves to the device, if known."""
        if self.handle is not None:
            return max(0, self.handle.estimated_device_bytes() - self.parked_bytes)
        return self.options.get("size_hint")

    def candidate(self, nbytes: int) -> Candidate:
        reload = self.swap_in_seconds if self.swap_in_seconds is not None else (self.load_seconds or 0.0)
        return Candidate(self.name, nbytes, self.tick, self.uses, reload)


class _Reservation:
    """Device room promised to a swap-in in flight. Its victims' bytes count towards it until they
    have left the device, so the accounted total never exceeds the budget at any moment."""

    __slots__ = ("entry", "need", "victims")

    def __init__(self, entry: _Entry, need: int, victims: List[_Entry]) -> None:
        self.entry, self.need, self.victims = entry, need, victims

    def claim(self) -> int:
        on_device = sum(v.device_bytes if v.tier is Tier.DEVICE else v.parked_bytes for v in self.victims)
        return max(self.need, on_device)


class Lease:
    """A model held resident on the device while the lease is held. Use as a context manager
    (``with cache.use(name) as model``) or call :meth:`acquire` and :meth:`release`."""

    __slots__ = ("_cache", "name", "timeout", "allow_host", "_entry", "_model", "hit")

    def __init__(self, cache: "ModelCache", name: str, timeout: Optional[float], allow_host: bool = False) -> None:
        self._cache, self.name, self.timeout, self.allow_host = cache, name, timeout, allow_host
        self._entry: Optional[_Entry] = None
        self._model: Any = None
        self.hit: Optional[bool] = None   #: after acquire: True if the model was already on the device

    def acquire(self) -> Any:
        """Make the model resident (waiting up to ``timeout`` seconds) and return it."""
        if self._entry is not None:
            raise ModelCacheError("this lease is already held; release it first", model=self.name)
        self._entry, self._model, self.hit = self._cache._acquire(self.name, self.timeout, lease=True,
                                                                  allow_host=self.allow_host)
        return self._model

    def release(self) -> None:
        """Give the lease back (idempotent)."""
        entry, self._entry, self._model = self._entry, None, None
        if entry is not None:
            self._cache._release(entry)

    @property
    def held(self) -> bool:
        return self._entry is not None

    @property
    def model(self) -> Any:
        if self._entry is None:
            raise ModelCacheError("the lease is not held", model=self.name)
        return self._model

    def __enter__(self) -> Any:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.name!r}, held={self.held})"


class ModelCache:
    """Keeps hot models on the device and parks the rest on the host or on disk.

    Args:
        device: CUDA ordinal; None means the monitor's device (the current one).
        device_budget: most device bytes the cache's models may take: bytes, ``"6GiB"`` or
            ``"80%"`` of the device's total. None: total minus ``reserve``.
        reserve: device bytes that must stay free, whoever else uses the device.
        host_budget: most host bytes for parked models. None: half the host's available RAM.
        disk_dir: folder for the disk tier; None disables it (models beyond the host budget are
            unloaded and reloaded by their loader).
        policy: ``"lru"``, ``"lfu"``, ``"cost"`` or a :class:`Policy`.
        monitor: the device memory signal. None: NVML for ``device``; on a machine without a GPU
            pass ``SimulatedDevice(total)``.
        watch_interval: seconds between background pressure checks; 0 or None disables the watcher.
        prefetch_workers: threads serving :meth:`prefetch`.
        max_swap_ins: most host->device moves in flight at once (None: no limit). Concurrent
            copies share one PCIe link, so when the link is saturated a limit does not slow the
            moves down in total, but it keeps fewer rooms reserved for moves in flight: more
            models stay resident. Requests beyond it wait for a slot (counted in ``waits.room``).
    """

    def __init__(self, device: Optional[int] = None, device_budget: Optional[Size] = None,
                 reserve: Size = "512MiB", host_budget: Optional[Size] = None,
                 disk_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                 policy: Union[str, Policy] = "lru", monitor: Optional[DeviceMonitor] = None, *,
                 watch_interval: Optional[float] = 0.5, prefetch_workers: int = 2,
                 max_swap_ins: Optional[int] = None) -> None:
        self.policy = make_policy(policy)
        if max_swap_ins is not None and (not isinstance(max_swap_ins, int) or max_swap_ins < 1):
            raise ConfigError(f"max_swap_ins={max_swap_ins!r}; use an int >= 1, or None for no limit")
        self.max_swap_ins = max_swap_ins
        self._owns_monitor = monitor is None
        if monitor is None:
            try:
                monitor = NvmlMonitor(device)
            except MonitorError as exc:
                raise MonitorError(f"{exc.reason}. On a machine without an NVIDIA GPU, pass "
                                   f"monitor=modelcache.SimulatedDevice(total='16GiB')") from exc
        elif device is not None and device != monitor.device:
            raise ConfigError(f"device={device} but the monitor watches device {monitor.device}")
        self.monitor = monitor
        self.device = monitor.device
        total = monitor.total_bytes()
        self.reserve_bytes = parse_size(reserve, total=total, what="reserve")
        if self.reserve_bytes >= total:
            raise ConfigError(f"reserve={reserve!r} ({self.reserve_bytes} B) must be below the device's "
                              f"total of {total} B")
        if device_budget is None:
            self.device_budget_bytes = total - self.reserve_bytes
        else:
            self.device_budget_bytes = parse_size(device_budget, total=total, what="device_budget")
            if not 0 < self.device_budget_bytes <= total:
                raise ConfigError(f"device_budget={device_budget!r} ({self.device_budget_bytes} B) must be "
                                  f"in 1..{total} B (the device's total)")
        host = HostMonitor()
        if host_budget is None:
            self.host_budget_bytes = host.available_bytes() // 2
        else:
            self.host_budget_bytes = parse_size(host_budget, total=host.total_bytes(), what="host_budget")
        self.disk_dir = os.fspath(disk_dir) if disk_dir is not None else None
        if self.disk_dir is not None:
            os.makedirs(self.disk_dir, exist_ok=True)
        if prefetch_workers < 1:
            raise ConfigError(f"prefetch_workers={prefetch_workers} must be >= 1")

        self._cond = threading.Condition(threading.Lock())
        self._entries: Dict[str, _Entry] = {}
        self._reservations: List[_Reservation] = []
        self._backends: Dict[Type[Backend], Backend] = {}
        self._clock = itertools.count(1)
        self._hits = self._misses = 0
        self._waiting = 0
        self._closed = False
        self._record = Recorder()
        self._policy_on_use = type(self.policy).on_use is not Policy.on_use
        self._executor = ThreadPoolExecutor(max_workers=prefetch_workers, thread_name_prefix="modelcache-prefetch")
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self.watch_interval = watch_interval
        LIVE_CACHES.add(self)
        if watch_interval:
            self._watcher = threading.Thread(target=self._watch, name="modelcache-watcher", daemon=True)
            self._watcher.start()

    # ------------------------------------------------------------------ registration
    def register(self, name: str, loader: Any, backend: Union[str, Type[Backend]] = "auto",
                 size_hint: Optional[Size] = None, pinned: bool = False, **options: Any) -> EntryInfo:
        """Register ``name``. Nothing is loaded until first use or :meth:`prefetch`.

        Args:
            loader: a callable with no arguments returning the model (functions, partials,
                classes, callable objects), or the model itself (a path, bytes, an array...;
                torch modules count as values).
            backend: ``"auto"`` (detected from what the loader returns), a backend name
                (``"python"``, ``"onnxruntime"``, ``"tensorrt"``) or a Backend subclass.
            size_hint: device bytes the model takes, for planning before its first load.
            pinned: never evicted by the policy or by pressure (explicit :meth:`evict` still moves it).
            options: passed to the backend (e.g. ``mode="weights"``).
        """
        return self._register(name, loader, backend, size_hint, pinned, options, owner=None)

    def _register(self, name: str, loader: Any, backend: Any, size_hint: Optional[Size], pinned: bool,
                  options: Dict[str, Any], owner: Any) -> EntryInfo:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r} must be a non-empty string")
        if backend != "auto":
            backend_class(backend)  # fail now on an unknown backend
        options = dict(options)
        if size_hint is not None:
            options["size_hint"] = parse_size(size_hint, what="size_hint")
            self._check_fits(name, options["size_hint"])
        entry = _Entry(name, loader, backend, options, bool(pinned), owner)
        with self._cond:
            self._check_open()
            existing = self._entries.get(name)
            if existing is not None:
                raise DuplicateModelError("already registered; unregister it first", model=name)
            self._entries[name] = entry
            return self._info(entry)

    def unregister(self, name: str, timeout: Optional[float] = _DEFAULT_TIMEOUT) -> None:
        """Forget ``name`` and free everything it holds. Raises :class:`ModelInUseError` if leased."""
        deadline = _deadline(timeout)
        while True:
            with self._cond:
                entry = self._get(name)
                if entry.leases:
                    raise ModelInUseError(f"cannot unregister: {entry.leases} lease(s) held", model=name)
                if entry.moving is None:
                    del self._entries[name]
                    entry.removed = True
                    handle, entry.handle, entry.tier = entry.handle, None, Tier.UNLOADED
                    self.policy.on_remove(name)
                    self._cond.notify_all()
                    break
                moving = entry.moving
            self._wait_move(entry, moving, deadline, timeout, up=False)
        if handle is not None and entry.backend is not None:
            _release_quietly(entry.backend, handle)

    # ------------------------------------------------------------------ the request path
    def use(self, name: str, timeout: Optional[float] = _DEFAULT_TIMEOUT, *, allow_host: bool = False) -> Lease:
        """A lease on ``name``: ``with cache.use(name) as model: ...``. While held, the model stays
        on the device. Entering waits up to ``timeout`` seconds (None: forever) for room.

        With ``allow_host=True``, a model parked on the host whose backend can serve it there
        (e.g. an ONNX Runtime CPU session) is handed out at once, and its move to the device
        starts in the background; the lease keeps it on the host meanwhile."""
        return Lease(self, name, timeout, allow_host)

    @contextlib.asynccontextmanager
    async def ause(self, name: str, timeout: Optional[float] = _DEFAULT_TIMEOUT, *,
                   allow_host: bool = False) -> AsyncIterator[Any]:
        """``async with cache.ause(name) as model``: :meth:`use` without blocking the event loop."""
        lease = Lease(self, name, timeout, allow_host)
        task = asyncio.get_running_loop().run_in_executor(None, lease.acquire)
        try:
            model = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda _: lease.release())
            raise
        try:
            yield model
        finally:
            lease.release()

    def _acquire(self, name: str, timeout: Optional[float], *, lease: bool,
                 target: Tier = Tier.DEVICE, allow_host: bool = False) -> Tuple[_Entry, Any, bool]:
        """Bring ``name`` up to ``target``; with ``lease``, hold it there and return the model, and
        whether it was a hit."""
        deadline = _deadline(timeout)
        missed = False
        while True:
            with self._cond:
                entry = self._get(name)
                if entry.tier <= target and entry.moving is None:           # resident: a hit
                    if not lease:
                        return entry, None, not missed
                    self._grant(entry)
                    if not missed:
                        entry.hits += 1
                        self._hits += 1
                    if self._policy_on_use:
                        self.policy.on_use(entry.candidate(entry.device_bytes))
                    assert entry.handle is not None and entry.backend is not None
                    return entry, entry.backend.model(entry.handle), not missed
                if lease and not missed:
                    missed = True
                    entry.misses += 1
                    self._misses += 1
                if allow_host and entry.tier is Tier.HOST:
                    host_model = self._serve_on_host(entry)
                    if host_model is not None:
                        return entry, host_model, False
                moving = entry.moving
                reservation = None
                if moving is not None:                                      # someone else is moving it
                    up = entry.moving_to is not None and entry.moving_to < entry.tier
                elif entry.tier is Tier.HOST:                               # host -> device: make room
                    reservation = self._plan_swap_in(entry, deadline, timeout)
                    if reservation is None:
                        continue                                            # waited for room; look again
                else:                                                       # disk/unloaded -> host
                    self._begin_move(entry, Tier.HOST)
            if moving is not None:
                self._wait_move(entry, moving, deadline, timeout, up=up)
            elif reservation is not None:
                self._swap_in(entry, reservation)
            else:
                self._step_up(entry)
                if entry.tier is Tier.DEVICE:   # the loader's result was already on the device
                    self._relieve(exclude=entry)
                elif target is not Tier.DEVICE:  # else the swap-in settles the host tier
                    self._settle_host(keep=entry)

    def _serve_on_host(self, entry: _Entry) -> Any:
        """Lock held: lease ``entry`` where it is, on the host, if its backend can serve it there,
        and start its move to the device unless one is under way."""
        assert entry.handle is not None and entry.backend is not None
        model = entry.backend.host_model(entry.handle)
        if model is None:
            return None
        self._grant(entry)
        self._record.incr("host_serves")
        if entry.moving is None:
            self._executor.submit(self._acquire, entry.name, _DEFAULT_TIMEOUT, lease=False)
        return model

    def _grant(self, entry: _Entry) -> None:
        """Lock held: one more lease on ``entry``, and a use for the policy's clock."""
        entry.leases += 1
        entry.uses += 1
        entry.tick = next(self._clock)
        entry.last_used = time.time()

    def _release(self, entry: _Entry) -> None:
        with self._cond:
            entry.leases -= 1
            if self._waiting:
                self._cond.notify_all()

    def _wait_move(self, entry: _Entry, moving: Future, deadline: Optional[float],
                   timeout: Optional[float], *, up: bool) -> None:
        """Wait for another thread's move of ``entry``; re-raise its error if it was bringing the
        model up (the request would have needed that load), ignore it otherwise."""
        try:
            moving.result(timeout=_remaining(deadline))
        except FutureTimeout:
            raise LeaseTimeoutError(f"timed out after {timeout} s waiting for its move to "
                                    f"{entry.moving_to} to finish", model=entry.name) from None
        except ModelCacheError:
            if up:
                raise

    # ------------------------------------------------------------------ planning (lock held)
    def _plan_swap_in(self, entry: _Entry, deadline: Optional[float],
                      timeout: Optional[float]) -> Optional[_Reservation]:
        """Reserve device room for ``entry`` and pick victims, or wait (lock released meanwhile)
        and return None. Raises ModelTooLargeError / DeviceBusyError."""
        need = entry.need() or 0
        self._check_fits(entry.name, need)
        if self.max_swap_ins is not None and len(self._reservations) >= self.max_swap_ins:
            victims = None                          # wait for a swap-in in flight to finish
        else:
            victims = self._choose_victims(need, exclude=entry)
        if victims is None:
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                self._record.incr("errors.busy")
                raise DeviceBusyError(self._busy_reason(need, timeout), model=entry.name)
            self._record.incr("waits.room")
            self._waiting += 1
            try:  # woken by a release or a finished move; re-read the monitor at least every 50 ms
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
            finally:
                self._waiting -= 1
            return None
        reservation = _Reservation(entry, need, victims)
        for victim in victims:
            victim.evicting_for = reservation
            self._begin_move(victim, self._eviction_target(victim))
        self._reservations.append(reservation)
        self._begin_move(entry, Tier.DEVICE)
        return reservation

    def _choose_victims(self, need: int, exclude: Optional[_Entry]) -> Optional[List[_Entry]]:
        """The victims that make room for ``need`` more device bytes, in policy order, such that
        the accounted bytes stay within the budget and the projected free memory stays at or
        above the reserve. None if evicting every evictable model would not be enough."""
        victims, enough = self._pick_victims(need, exclude)
        if not enough:
            for victim in victims:
                victim.unpark_after = False
            return None
        for victim in victims:
            self.policy.on_evict(victim.candidate(victim.device_bytes))
        return victims

    def _pick_victims(self, need: int, exclude: Optional[_Entry]) -> Tuple[List[_Entry], bool]:
        """Lock held: victims in ranked order until ``need`` more bytes fit both the budget and the
        reserve, and whether they suffice. A model ranked again for an unpark after its eviction
        is marked ``unpark_after`` instead of listed twice."""
        over_budget = self._accounted_bytes() + need - self.device_budget_bytes
        pending = sum(r.need for r in self._reservations)
        short_free = self.reserve_bytes - (self.monitor.free_bytes() - pending - need)
        victims: List[_Entry] = []
        freed = 0
        for candidate, unpark in self._ranked_victims(exclude):
            if freed >= over_budget and freed >= short_free:
                break
            victim = self._entries[candidate.name]
            if unpark and victim in victims:
                victim.unpark_after = True      # evicted and its kept bytes freed too
            else:
                victims.append(victim)
            freed += candidate.nbytes
        return victims, freed >= over_budget and freed >= short_free

    def _evictable(self, exclude: Optional[_Entry] = None) -> List[Candidate]:
        return [e.candidate(e.freed_by_eviction) for e in self._entries.values()
                if e.tier is Tier.DEVICE and e.moving is None and e.leases == 0 and not e.pinned
                and e is not exclude]

    def _ranked_victims(self, exclude: Optional[_Entry] = None) -> List[Tuple[Candidate, bool]]:
        """(candidate, unpark) pairs: resident models in policy order (evict); then parked models
        that keep device bytes (unpark: their backend drops e.g. a session kept for fast
        swap-ins); then, once more, resident models whose eviction would keep such bytes (evict
        and unpark). ``candidate.nbytes`` is what each step frees."""
        evictable = self._evictable(exclude)
        parked = [e.candidate(e.unpark_frees) for e in self._entries.values()
                  if e.tier is Tier.HOST and e.moving is None and e.leases == 0 and e is not exclude
                  and e.unpark_frees > 0]
        kept = [dataclasses.replace(c, nbytes=self._entries[c.name].handle.unpark_frees_bytes())  # type: ignore[union-attr]
                for c in evictable]
        return ([(c, False) for c in self.policy.rank(evictable)] + [(c, True) for c in self.policy.rank(parked)]
                + [(c, True) for c in self.policy.rank([c for c in kept if c.nbytes > 0])])

    def _accounted_bytes(self) -> int:
        """Device bytes the cache answers for: residents, what parked models keep on the device,
        and rooms promised to swap-ins."""
        total = sum(e.device_bytes if e.tier is Tier.DEVICE else e.parked_bytes for e in self._entries.values()
                    if e.evicting_for is None)
        return total + sum(r.claim() for r in self._reservations)

    def _eviction_target(self, entry: _Entry) -> Tier:
        """Host (for a parked model: stay there, unparked), unless the model alone is larger than
        the host budget."""
        assert entry.handle is not None
        if entry.tier is Tier.HOST:
            return Tier.HOST
        if entry.handle.estimated_host_bytes() <= self.host_budget_bytes:
            return Tier.HOST
        return self._below_host(entry)

    def _below_host(self, entry: _Entry) -> Tier:
        backend = entry.backend
        if self.disk_dir is not None and backend is not None and backend.supports_disk:
            return Tier.DISK
        return Tier.UNLOADED

    def _begin_move(self, entry: _Entry, target: Tier) -> None:
        entry.moving = Future()
        entry.moving_to = target

    def _end_move(self, entry: _Entry, error: Optional[BaseException] = None) -> None:
        """Lock held: finish ``entry``'s move and wake its waiters."""
        moving, entry.moving, entry.moving_to, entry.evicting_for = entry.moving, None, None, None
        entry.unpark_after = False
        if error is not None:
            entry.last_error = str(error)
        self._cond.notify_all()
        if moving is not None:
            if error is None:
                moving.set_result(None)
            else:
                moving.set_exception(error)

    def _check_fits(self, name: str, need: int) -> None:
        limit = min(self.device_budget_bytes, self.monitor.total_bytes() - self.reserve_bytes)
        if need > limit:
            raise ModelTooLargeError(
                f"needs {need} B ({format_bytes(need)}) on the device, more than the whole budget of "
                f"{limit} B ({format_bytes(limit)}; device_budget={self.device_budget_bytes} B, "
                f"reserve={self.reserve_bytes} B)", model=name)

    def _busy_reason(self, need: int, timeout: Optional[float]) -> str:
        leased = sorted(e.name for e in self._entries.values() if e.tier is Tier.DEVICE and e.leases)
        if self.max_swap_ins is not None and len(self._reservations) >= self.max_swap_ins:
            return (f"no swap-in slot after {timeout} s: {len(self._reservations)} swap-ins in flight, "
                    f"max_swap_ins={self.max_swap_ins}")
        return (f"no room for {need} B on the device after {timeout} s: {self._accounted_bytes()} B of the "
                f"{self.device_budget_bytes} B budget in use or promised, {self.monitor.free_bytes()} B free "
                f"against a reserve of {self.reserve_bytes} B; leased: {leased or 'none'}")

    # ------------------------------------------------------------------ moves (lock not held)
    def _step_up(self, entry: _Entry) -> None:
        """Disk -> host, or unloaded -> host through the loader. ``entry.moving`` is set."""
        start = time.perf_counter()
        handle = entry.handle
        try:
            if handle is None:
                handle = self._load(entry)
                kind = "load"
            else:
                assert entry.backend is not None
                entry.backend.from_disk(handle)
                kind = "from_disk"
        except BaseException as exc:
            error = self._wrap(entry, exc, "loading" if handle is None else "reading it from disk")
            with self._cond:
                self._record.incr("load_errors" if handle is None else "errors.move")
                self._end_move(entry, error)
            _reraise(error, exc)
        seconds = time.perf_counter() - start
        self._record.observe(kind, seconds)
        with self._cond:
            if kind == "load":
                entry.load_seconds = seconds
            if entry.removed:                     # unregistered meanwhile: free what we made
                self._end_move(entry)
                orphan = handle
            else:
                entry.handle, entry.tier, orphan = handle, handle.tier, None
                entry.last_error = None
                self._end_move(entry)
        if orphan is not None and entry.backend is not None:
            _release_quietly(entry.backend, orphan)

    def _load(self, entry: _Entry) -> Handle:
        try:
            value = _call_loader(entry.loader)
        except BaseException as exc:
            raise LoaderError(f"the loader raised {type(exc).__name__}: {exc}", model=entry.name) from exc
        finally:
            with self._cond:
                entry.loads += 1
                self._record.incr("loads")
        if entry.backend is None:
            if entry.backend_spec == "auto":
                cls = detect_backend(entry.name, value, entry.options)
            else:
                cls = backend_class(entry.backend_spec)
            entry.backend = self._backend(cls)
        return entry.backend.load(entry.name, value, entry.options)

    def _swap_in(self, entry: _Entry, reservation: _Reservation) -> None:
        """Evict the reservation's victims, then move ``entry`` host -> device."""
        for i, victim in enumerate(reservation.victims):
            try:
                self._move_down(victim, "room")
            except ModelCacheError as exc:
                error = BackendError(f"could not make room on the device: {exc}", model=entry.name)
                with self._cond:
                    for untouched in reservation.victims[i + 1:]:
                        self._end_move(untouched)
                    self._reservations.remove(reservation)
                    self._end_move(entry, error)
                raise error from exc
        assert entry.handle is not None and entry.backend is not None
        start = time.perf_counter()
        try:
            entry.backend.to_device(entry.handle)
        except BaseException as exc:
            error = self._wrap(entry, exc, "moving it to the device")
            with self._cond:
                self._record.incr("errors.move")
                self._reservations.remove(reservation)
                self._end_move(entry, error)
            _reraise(error, exc)
        seconds = time.perf_counter() - start
        self._record.observe("swap_in", seconds)
        with self._cond:
            self._reservations.remove(reservation)
            entry.swap_in_seconds = seconds
            entry.tier = Tier.DEVICE
            entry.last_error = None
            self._end_move(entry)
            over = self._accounted_bytes() > self.device_budget_bytes
        self._settle_host()  # after the move: the model's own host bytes may have left with it
        if over:  # the backend measured more than it estimated: restore the budget (not with this model)
            self._relieve(exclude=entry)

    def _move_down(self, entry: _Entry, reason: str) -> None:
        """Move ``entry`` down to ``entry.moving_to`` (set by the planner), a step at a time,
        committing after each step. Raises BackendError; the entry then stays where it got to."""
        target = entry.moving_to
        assert entry.handle is not None and entry.backend is not None and target is not None
        backend, handle = entry.backend, entry.handle
        try:
            if handle.tier is Tier.HOST and target is Tier.HOST:   # a parked model: free what it keeps
                backend.unpark(handle)
                self._record.incr("unparks")
            if handle.tier is Tier.DEVICE:
                if target is not Tier.UNLOADED:   # unloading frees the device directly
                    start = time.perf_counter()
                    backend.to_host(handle)
                    self._record.observe("swap_out", time.perf_counter() - start)
                    if entry.unpark_after and target is Tier.HOST:
                        backend.unpark(handle)
                        self._record.incr("unparks")
                self._record.incr("evictions")
                self._record.incr(f"evictions.{reason}")
            if target is Tier.DISK and handle.tier is not Tier.DISK:
                with self._cond:                  # the device bytes are gone: let planners see it
                    entry.tier, entry.evicting_for = handle.tier, None
                    self._cond.notify_all()
                start = time.perf_counter()
                assert self.disk_dir is not None
                backend.to_disk(handle, self.disk_dir)
                self._record.observe("to_disk", time.perf_counter() - start)
                self._record.incr("demotions.disk")
            elif target is Tier.UNLOADED:
                backend.release(handle)
                self._record.incr("demotions.unloaded")
        except BaseException as exc:
            error = self._wrap(entry, exc, f"moving it to {target}")
            with self._cond:
                self._record.incr("errors.move")
                entry.tier = handle.tier
                self._end_move(entry, error)
            logger.warning("%s", error)
            _reraise(error, exc)
        with self._cond:
            entry.tier = handle.tier
            if entry.tier is Tier.UNLOADED:
                entry.handle = None
            self._end_move(entry)

    def _settle_host(self, keep: Optional[_Entry] = None) -> None:
        """Demote parked models (policy order) to disk or unloaded while the host budget is exceeded."""
        with self._cond:
            over = sum(e.host_bytes for e in self._entries.values()) - self.host_budget_bytes
            if over <= 0 or self._closed:
                return
            candidates = [e.candidate(e.host_bytes) for e in self._entries.values()
                          if e.tier is Tier.HOST and e.moving is None and e.leases == 0 and e is not keep]
            victims = []
            for candidate in self.policy.rank(candidates):
                if over <= 0:
                    break
                victim = self._entries[candidate.name]
                self._begin_move(victim, self._below_host(victim))
                victims.append(victim)
                over -= candidate.nbytes
        for victim in victims:
            try:
                self._move_down(victim, "host")
            except ModelCacheError:
                pass  # logged by _move_down; the model stays on the host

    def check_pressure(self) -> int:
        """Evict (policy order) until the accounted bytes fit the budget and the device's free
        memory is at least the reserve. The background watcher calls this; returns the number of
        models evicted."""
        return self._relieve()

    def _relieve(self, exclude: Optional[_Entry] = None) -> int:
        with self._cond:
            if self._closed:
                return 0
            victims, _ = self._pick_victims(0, exclude)   # as many as there are, enough or not
            for victim in victims:
                self.policy.on_evict(victim.candidate(victim.device_bytes))
                self._begin_move(victim, self._eviction_target(victim))
        evicted = 0
        for victim in victims:
            try:
                self._move_down(victim, "pressure")
                evicted += 1
            except ModelCacheError:
                pass
        if victims:
            self._settle_host()
        return evicted

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_interval):
            try:
                self.check_pressure()
            except Exception:  # the watcher must survive a bad reading
                logger.exception("modelcache: pressure check failed")

    # ------------------------------------------------------------------ other operations
    def prefetch(self, name: str, tier: Tier = Tier.DEVICE,
                 timeout: Optional[float] = _DEFAULT_TIMEOUT) -> "Future[EntryInfo]":
        """Bring ``name`` up to ``tier`` in the background, without holding a lease. The Future
        gives the model's :class:`EntryInfo`, or raises what a ``use()`` would have raised."""
        tier = Tier(tier)
        if tier is Tier.UNLOADED:
            raise ConfigError(f"prefetch(tier={tier!r}): choose DEVICE, HOST or DISK", model=name)
        with self._cond:
            self._get(name)

        def job() -> EntryInfo:
            self._acquire(name, timeout, lease=False, target=tier)
            return self.info(name)

        return self._executor.submit(job)

    def evict(self, name: str, tier: Tier = Tier.HOST, timeout: Optional[float] = _DEFAULT_TIMEOUT) -> EntryInfo:
        """Move ``name`` down to ``tier`` (HOST, DISK or UNLOADED) now; a model already at or below
        it stays. Raises :class:`ModelInUseError` while leased."""
        tier = Tier(tier)
        if tier is Tier.DEVICE:
            raise ConfigError("evict(tier=Tier.DEVICE) is not a move down; use prefetch()", model=name)
        if tier is Tier.DISK and self.disk_dir is None:
            raise ConfigError("evict(tier=Tier.DISK) needs the cache's disk_dir", model=name)
        deadline = _deadline(timeout)
        while True:
            with self._cond:
                entry = self._get(name)
                moving = entry.moving
                if moving is None:
                    if entry.tier >= tier:
                        return self._info(entry)
                    if entry.leases:
                        raise ModelInUseError(f"cannot evict: {entry.leases} lease(s) held", model=name)
                    if tier is Tier.DISK and not (entry.backend and entry.backend.supports_disk):
                        raise ConfigError(f"the {entry.backend and entry.backend.name} backend has no "
                                          f"disk tier", model=name)
                    self._begin_move(entry, tier)
            if moving is not None:
                self._wait_move(entry, moving, deadline, timeout, up=False)
                continue
            self._move_down(entry, "explicit")
            self._settle_host()
            return self.info(name)

    def info(self, name: str) -> EntryInfo:
        """A snapshot of ``name``'s state."""
        with self._cond:
            return self._info(self._get(name))

    def entries(self) -> List[EntryInfo]:
        """Snapshots of every registered model."""
        with self._cond:
            return [self._info(e) for e in self._entries.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> Dict[str, Union[int, float]]:
        """A flat dict with dotted keys; bytes and seconds."""
        out: Dict[str, Union[int, float]] = {key: 0 for key in (
            "loads", "load_errors", "evictions", "evictions.room", "evictions.pressure",
            "evictions.explicit", "demotions.disk", "demotions.unloaded", "waits.room", "errors.busy",
            "errors.move", "host_serves", "unparks")}
        out.update(self._record.snapshot())
        reading = self.monitor.reading()
        with self._cond:
            entries = list(self._entries.values())
            out["hits"], out["misses"] = self._hits, self._misses
            out["models"] = len(entries)
            for tier in Tier:
                out[f"models.{tier}"] = sum(1 for e in entries if e.tier is tier)
            out["leases.active"] = sum(e.leases for e in entries)
            out["device.bytes"] = sum(e.device_bytes + e.parked_bytes for e in entries)
            out["device.parked_bytes"] = sum(e.parked_bytes for e in entries)
            out["device.accounted_bytes"] = self._accounted_bytes()
            out["host.bytes"] = sum(e.host_bytes for e in entries)
        total_uses = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / total_uses if total_uses else 0.0
        out["device.budget_bytes"] = self.device_budget_bytes
        out["device.reserve_bytes"] = self.reserve_bytes
        out["device.total_bytes"] = reading.total_bytes
        out["device.free_bytes"] = reading.free_bytes
        out["device.used_bytes"] = reading.used_bytes
        if reading.process_bytes is not None:
            out["device.process_bytes"] = reading.process_bytes
        out["host.budget_bytes"] = self.host_budget_bytes
        with self._cond:
            backends = list(self._backends.values())
        for backend in backends:
            for key, value in backend.stats().items():
                out[f"{backend.name}.{key}"] = value
        return out

    def status(self) -> Dict[str, Any]:
        """``stats()`` plus every entry, JSON-ready (what ``modelcache status --cache FILE`` shows)."""
        entries = []
        for info in self.entries():
            row = {k: getattr(info, k) for k in ("name", "device_bytes", "host_bytes", "disk_path", "hits",
                                                  "misses", "loads", "leases", "last_used", "backend", "pinned")}
            row["tier"] = str(info.tier)
            row["mode"] = info.details.get("mode")
            entries.append(row)
        return {"time": time.time(), "device": self.device, "policy": self.policy.name, "stats": self.stats(),
                "entries": entries}

    def dump_status(self, path: str) -> None:
        """Write :meth:`status` to ``path`` atomically, for ``modelcache status --cache PATH``."""
        import json
        from ._fileio import atomic_write
        atomic_write(path, json.dumps(self.status(), indent=1, default=str).encode())

    def close(self, timeout: Optional[float] = _DEFAULT_TIMEOUT) -> None:
        """Stop the watcher, wait for moves in flight, free every model. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)
        deadline = _deadline(timeout)
        for entry in list(self._entries.values()):
            moving = entry.moving
            if moving is not None:
                with contextlib.suppress(Exception):
                    moving.result(timeout=_remaining(deadline))
        with self._cond:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            if entry.leases:
                logger.warning("modelcache: closing with %d lease(s) held on %r", entry.leases, entry.name)
            if entry.handle is not None and entry.backend is not None:
                _release_quietly(entry.backend, entry.handle)
            entry.handle, entry.removed = None, True
        for backend in self._backends.values():
            with contextlib.suppress(Exception):
                backend.close()
        if self._owns_monitor:
            self.monitor.close()

    def __enter__(self) -> "ModelCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ decorators
    def model(self, name: str, *, backend: Union[str, Type[Backend]] = "auto", size_hint: Optional[Size] = None,
              pinned: bool = False, **options: Any) -> Callable[[Callable[[], Any]], Callable[..., Lease]]:
        """Register the decorated loader under ``name``; calling the result returns a lease::

            @cache.model("bert", backend="onnxruntime")
            def load_bert(): return "models/bert.onnx"
            with load_bert() as session: ...
        """
        def decorate(fn: Callable[[], Any]) -> Callable[..., Lease]:
            self._register(name, fn, backend, size_hint, pinned, options, owner=fn)

            @functools.wraps(fn)
            def lease(timeout: Optional[float] = _DEFAULT_TIMEOUT) -> Lease:
                return self.use(name, timeout)

            lease.model_name = name  # type: ignore[attr-defined]
            lease.cache = self       # type: ignore[attr-defined]
            return lease
        return decorate

    def multiplexed(self, *, backend: Union[str, Type[Backend]] = "auto", prefix: str = "",
                    size_hint: Optional[Size] = None, **options: Any
                    ) -> Callable[[Callable[[str], Any]], Callable[..., Lease]]:
        """One loader for many model ids (as Ray Serve's multiplexing): ``load(model_id)`` registers
        ``prefix + model_id`` on first call and returns a lease on it::

            @cache.multiplexed(backend="onnxruntime")
            def load(model_id): return f"models/{model_id}.onnx"
            with load("en-v2") as session: ...
        """
        def decorate(fn: Callable[[str], Any]) -> Callable[..., Lease]:
            @functools.wraps(fn)
            def lease(model_id: str, timeout: Optional[float] = _DEFAULT_TIMEOUT) -> Lease:
                if not isinstance(model_id, str) or not model_id:
                    raise ConfigError(f"model_id={model_id!r} must be a non-empty string")
                name = prefix + model_id
                entry = self._entries.get(name)
                if entry is None:
                    try:
                        self._register(name, functools.partial(fn, model_id), backend, size_hint, False,
                                       options, owner=fn)
                    except DuplicateModelError:
                        entry = self._entries.get(name)   # registered by a concurrent call
                if entry is not None and entry.owner is not fn:
                    raise DuplicateModelError("already registered by something other than this "
                                              "multiplexed loader", model=name)
                return self.use(name, timeout)

            lease.cache = self  # type: ignore[attr-defined]
            return lease
        return decorate

    # ------------------------------------------------------------------ helpers
    def _get(self, name: str) -> _Entry:
        if self._closed:
            raise CacheClosedError("the cache is closed", model=name)
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError("not registered", model=name)
        return entry

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError("the cache is closed")

    def _backend(self, cls: Type[Backend]) -> Backend:
        with self._cond:
            backend = self._backends.get(cls)
            if backend is None:
                backend = cls(BackendContext(self.device, self.monitor, self.disk_dir))
                self._backends[cls] = backend
            return backend

    def _wrap(self, entry: _Entry, exc: BaseException, doing: str) -> ModelCacheError:
        if isinstance(exc, ModelCacheError):
            if exc.model is None:
                exc.model = entry.name
            return exc
        return BackendError(f"{type(exc).__name__} while {doing}: {exc}", model=entry.name)

    def _info(self, e: _Entry) -> EntryInfo:
        return EntryInfo(
            name=e.name, tier=e.tier, device_bytes=e.device_bytes, host_bytes=e.host_bytes,
            disk_path=e.handle.disk_path if e.handle is not None else None, hits=e.hits, misses=e.misses,
            loads=e.loads, leases=e.leases, last_used=e.last_used,
            backend=e.backend.name if e.backend is not None else (
                e.backend_spec if isinstance(e.backend_spec, str) else getattr(e.backend_spec, "name", None)),
            pinned=e.pinned, moving_to=e.moving_to, swap_in_seconds=e.swap_in_seconds,
            last_error=e.last_error, details=e.handle.details() if e.handle is not None else {})

    def __repr__(self) -> str:
        return (f"ModelCache(device={self.device}, models={len(self._entries)}, "
                f"budget={format_bytes(self.device_budget_bytes)}, policy={self.policy.name!r})")


def _call_loader(loader: Any) -> Any:
    """A loader is called if callable (torch modules and tensors count as values), else returned."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(loader, (torch.nn.Module, torch.Tensor)):
        return loader
    return loader() if callable(loader) else loader


def _reraise(error: ModelCacheError, exc: BaseException) -> None:
    """Raise ``error``; keep ``exc``'s own cause when it is ``exc`` itself."""
    if error is exc:
        raise error
    raise error from exc


def _release_quietly(backend: Backend, handle: Handle) -> None:
    try:
        backend.release(handle)
    except Exception:
        logger.exception("modelcache: releasing %r failed", handle.name)


def _deadline(timeout: Optional[float]) -> Optional[float]:
    if timeout is not None and timeout < 0:
        raise ConfigError(f"timeout={timeout!r} must be >= 0 seconds or None")
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
