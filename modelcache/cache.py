"""The cache: registered models, leases, and the moves that keep the device within budget.

A request's path, top to bottom in this file: ``use()`` returns a :class:`Lease` (``lease.py``);
entering it calls ``_acquire()``, which either finds the model resident (a hit) or makes it resident
(``_step_up`` from disk/unloaded to the host, then ``_plan_swap_in`` + ``_swap_in`` onto the
device, evicting victims first); the caller runs the model; leaving the lease calls
``_release()``. What a model holds and which models give way is the ledger's (``ledger.py``).

Locking: one condition variable guards the ledger and every entry. It is never held while a
loader runs or a backend moves bytes; an entry with a move in flight carries a Future
(``entry.moving``) that other requests for it wait on, so one model is loaded once however many
ask for it.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

from . import closing, decorators
from ._fileio import atomic_write
from .backends import Backend, BackendContext, Handle, backend_class, detect_backend
from .config import check_timeout, resolve
from .devices import DeviceMonitor
from .errors import (BackendError, CacheClosedError, ConfigError, DeviceBusyError, DuplicateModelError,
                     LeaseTimeoutError, LoaderError, ModelCacheError, ModelInUseError, ModelNotFoundError)
from .events import Event, Events
from .lease import Lease
from .ledger import Entry, Ledger, Reservation
from .moves import Mover, Request, call_loader, release_quietly
from .policies import Policy
from .sizes import Size, format_bytes, parse_size
from .stats import Recorder, stats_of, status_of
from .tiers import EntryInfo, Tier
from .watcher import RuntimeGrowth, Watcher

logger = logging.getLogger("modelcache")

_DEFAULT_TIMEOUT = decorators.DEFAULT_TIMEOUT


class ModelCache(decorators.Decorators):     # the decorators model() and multiplexed(): decorators.py
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
        s = resolve(device, device_budget, reserve, host_budget, disk_dir, policy, monitor, watch_interval,
                    prefetch_workers, max_swap_ins)
        self.policy, self.monitor, self.device = s.policy, s.monitor, s.monitor.device
        self.device_budget_bytes, self.reserve_bytes = s.device_budget_bytes, s.reserve_bytes
        self.host_budget_bytes, self.disk_dir = s.host_budget_bytes, s.disk_dir
        self._disk_space = s.disk_space          # this cache's own folder inside disk_dir
        self.watch_interval, self.max_swap_ins = s.watch_interval, s.max_swap_ins
        self._owns_monitor = s.owns_monitor
        self._ledger = Ledger(self.policy, self.device_budget_bytes, self.reserve_bytes, self.host_budget_bytes,
                              self.monitor.total_bytes(), self.disk_dir is not None)
        self._entries = self._ledger.entries
        self._lock = threading.Lock()     # the hit path takes it directly (a Condition's with is Python code)
        self._cond = threading.Condition(self._lock)
        self._backends: Dict[Type[Backend], Backend] = {}
        self._reclaiming = False          # a backend gives back memory its runtime kept (_reclaim_locked)
        self._clock = itertools.count(1)
        self._hits = self._misses = self._waiting = 0
        self._closed = False
        self._record = Recorder()
        self._policy_on_use = type(self.policy).on_use is not Policy.on_use
        self._events = Events()
        self._moves = Mover(self)
        self._executor = ThreadPoolExecutor(max_workers=s.prefetch_workers, thread_name_prefix="modelcache-prefetch")
        self._growth = RuntimeGrowth()
        self._watcher = Watcher(self.check_pressure, watch_interval) if watch_interval else None
        closing.LIVE.add(self)

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
            self._ledger.check_fits(name, options["size_hint"])
        entry = Entry(name, loader, backend, options, bool(pinned), owner)
        with self._cond:
            self._check_open()
            if name in self._entries:
                raise DuplicateModelError("already registered; unregister it first", model=name)
            self._entries[name] = entry
            return entry.snapshot()

    def unregister(self, name: str, timeout: Optional[float] = _DEFAULT_TIMEOUT) -> None:
        """Forget ``name`` and free everything it holds. Raises :class:`ModelInUseError` if leased."""
        request = Request(timeout)
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
            self._wait_move(entry, moving, request, up=False)
        if handle is not None and entry.backend is not None:
            release_quietly(entry.backend, handle)

    def on(self, event: str, hook: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``hook(Event)`` after every ``event``: ``"load"``, ``"swap_in"``, ``"eviction"``,
        ``"demotion"`` or ``"error"`` (outside the cache's lock; a hook that raises is logged and
        skipped). Returns a function that removes the hook."""
        return self._events.on(event, hook)

    # ------------------------------------------------------------------ the request path
    def use(self, name: str, timeout: Optional[float] = _DEFAULT_TIMEOUT, *, allow_host: bool = False) -> Lease[Any]:
        """A lease on ``name``: ``with cache.use(name) as model: ...``. While held, the model stays
        on the device. Entering waits up to ``timeout`` seconds (None: forever) for room.

        With ``allow_host=True``, a model parked on the host whose backend can serve it there
        (e.g. an ONNX Runtime CPU session) is handed out at once, and its move to the device
        starts in the background; the lease keeps it on the host meanwhile."""
        if timeout is not None and (type(timeout) is not float and type(timeout) is not int or not timeout >= 0):
            timeout = check_timeout(timeout, name)        # raises ConfigError naming the value
        return Lease(self, name, timeout, allow_host)

    def ause(self, name: str, timeout: Optional[float] = _DEFAULT_TIMEOUT, *, allow_host: bool = False) -> Lease[Any]:
        """``async with cache.ause(name) as model``: :meth:`use` for async code (a :class:`Lease`
        works with ``with`` and ``async with`` alike). A hit is served on the event loop at once;
        a miss waits on the cache's own worker threads, never the loop's default executor, and a
        cancelled request gives its place in line back at once. Run the model itself off the loop
        (``await asyncio.to_thread(model.run, ...)``, or a thread pool of your own)."""
        return self.use(name, timeout, allow_host=allow_host)

    def _acquire(self, name: str, timeout: Optional[float], lease: bool, target: Tier = Tier.DEVICE,
                 allow_host: bool = False, request: Optional[Request] = None) -> Tuple[Entry, Any, bool, bool]:
        """Bring ``name`` up to ``target``; with ``lease``, hold it there and return the model,
        whether it was a hit and whether it waited for room."""
        with self._lock:                                                    # resident: a hit
            entry = self._entries.get(name)
            if entry is not None and entry.tier <= target and entry.moving is None and not self._closed:
                return entry, self._hand_out(entry, lease, True), True, False
            self._get(name)                          # closed, or not registered: says which
        request = request or Request(timeout)
        try:
            entry, model, hit = self._make_resident(name, request, lease, target, allow_host)
            return entry, model, hit, request.place is not None
        finally:
            self._leave_line(request)

    def _try_hit(self, name: str) -> Optional[Tuple[Entry, Any]]:
        """A lease on ``name`` if it is resident now (never waits beyond the lock), else None."""
        with self._lock:
            entry = self._get(name)
            if entry.tier is Tier.DEVICE and entry.moving is None:
                return entry, self._hand_out(entry, True, hit=True)
        return None

    def _leave_line(self, request: Request, *, wake: bool = False) -> None:
        """``request`` gives its place in the line for room back (if it has one); ``wake``: wake
        its thread too (its caller gave up)."""
        if request.place is not None or wake:
            with self._cond:
                if request.place is not None and self._ledger.leave_line(request.place) or wake:
                    self._cond.notify_all()

    def _hand_out(self, entry: Entry, lease: bool, hit: bool, held: bool = False) -> Any:
        """Lock held, ``entry`` resident: with ``lease``, one more lease on it (``held``: its swap-in
        took it already) and its model."""
        if not lease:
            return None
        self._grant(entry, held)
        if hit:
            entry.hits += 1
            self._hits += 1
        if self._policy_on_use:
            self.policy.on_use(entry.candidate(entry.device_bytes))
        return entry.backend.model(entry.handle)  # type: ignore[union-attr,arg-type]  # resident: both set

    def _make_resident(self, name: str, request: Request, lease: bool, target: Tier,
                       allow_host: bool) -> Tuple[Entry, Any, bool]:
        """The miss path: one step at a time until ``name`` is resident (lock released during each)."""
        missed = False
        # a swap-in this request starts commits holding its lease ("held"), so nothing evicts the
        # model before the request takes it; a request that gave up ("abandoned") hands it back
        claim = ["wanted" if lease else "none"]
        while True:
            request.check()                       # an async caller that gave up
            with self._cond:
                entry = self._get(name)
                if claim[0] == "held":            # its swap-in committed holding this request's lease
                    return entry, self._hand_out(entry, lease, hit=False, held=True), False
                if entry.tier <= target and entry.moving is None:           # resident now
                    return entry, self._hand_out(entry, lease, hit=not missed), not missed
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
                    reservation = self._plan_swap_in(entry, request)
                    if reservation is None:
                        continue                                            # waited for room; look again
                else:                                                       # disk/unloaded -> host
                    self._moves.begin_locked(entry, Tier.HOST)
            if moving is not None:
                self._wait_move(entry, moving, request, up=up)
            elif reservation is not None:
                try:
                    self._moves.run(lambda: self._swap_in(entry, reservation, claim), entry, request)
                except BaseException:
                    with self._cond:
                        if claim[0] == "held":     # committed, but this request is gone: give it back
                            entry.leases -= 1
                            self._cond.notify_all()
                        claim[0] = "abandoned"
                    raise
            else:
                self._moves.run(lambda: self._step_up_then_settle(entry, target, request.loop), entry, request)

    def _step_up_then_settle(self, entry: Entry, target: Tier, loop: Any = None) -> None:
        self._step_up(entry, loop)
        if entry.tier is Tier.DEVICE:   # the loader's result was already on the device
            self._moves.relieve(exclude=entry, measured=True)
        elif target is not Tier.DEVICE:  # else the swap-in settles the host tier
            self._moves.settle_host(keep=entry)

    def _serve_on_host(self, entry: Entry) -> Any:
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

    def _grant(self, entry: Entry, counted: bool = False) -> None:
        """Lock held: one more lease on ``entry`` (``counted``: taken already), and a use for the
        policy's clock."""
        if not counted:
            entry.leases += 1
        entry.uses += 1
        entry.tick = next(self._clock)
        entry.last_used = time.time()

    def _release(self, entry: Entry) -> None:
        with self._lock:
            entry.leases -= 1
            if self._waiting or self._closed:
                self._cond.notify_all()

    def _wait_move(self, entry: Entry, moving: Future[None], request: Request, *, up: bool) -> None:
        """Wait for another thread's move of ``entry``; re-raise its error if it was bringing the
        model up (the request would have needed that load), ignore it otherwise."""
        try:
            request.result(moving, entry.name, f"waited for its move to {entry.moving_to} to finish")
        except LeaseTimeoutError:
            raise
        except ModelCacheError:
            if up:
                raise

    def _reclaim_locked(self) -> bool:
        """Lock held (released meanwhile): before models are evicted for room, backends give back
        device memory their runtimes keep without need (``Backend.reclaim_device_bytes``). True
        if one did (or another thread's reclaim finished meanwhile)."""
        if self._reclaiming:
            while self._reclaiming:
                self._cond.wait()
            return True
        backends = [b for b in self._backends.values() if b.reclaimable_device_bytes() > 0]
        if not backends:
            return False
        self._reclaiming = True
        self._lock.release()
        try:
            for backend in backends:
                try:
                    backend.reclaim_device_bytes()
                except Exception:           # pragma: no cover - nothing given back; models are evicted instead
                    logger.warning("modelcache: %s could not give back device memory", type(backend).__name__,
                                   exc_info=True)
        finally:
            self._lock.acquire()
            self._reclaiming = False
            self._cond.notify_all()
        return True

    def _plan_swap_in(self, entry: Entry, request: Request) -> Optional[Reservation]:
        """Lock held: reserve device room for ``entry`` and pick victims, or wait (lock released
        meanwhile) and return None. While older requests wait for room, this one lines up behind
        them. Raises ModelTooLargeError / DeviceBusyError."""
        ledger = self._ledger
        ledger.check_fits(entry.name, entry.firm_need())
        need = min(entry.need() or 0, ledger.limit())   # an estimate never makes a model too large
        victims = None
        place = request.place
        if ledger.first_in_line(place) and (self.max_swap_ins is None
                                             or len(ledger.reservations) < self.max_swap_ins):
            if ledger.accounted_bytes() + need > ledger.device_budget and self._reclaim_locked():
                return None                         # memory runtimes kept went back: plan again
            if not ledger.shared_leaving(entry):    # else wait: planned once its session has gone
                victims = ledger.choose_victims(need, entry, self.monitor.free_bytes(), request.waited_s())
        if victims is None:                         # no room yet, no swap-in slot, or older requests first
            request.check()                         # gave up: no place in line again
            if request.place is None:
                request.place, request.since = object(), time.monotonic()
            ahead = ledger.wait_in_line(request.place)
            remaining = request.left()
            if remaining is not None and remaining <= 0:
                self._record.incr("errors.busy")
                raise DeviceBusyError(ledger.busy_reason(need, request.timeout, self.monitor.free_bytes(),
                                                         self.max_swap_ins, ahead), model=entry.name)
            self._record.incr("waits.room")
            self._waiting += 1
            try:  # woken by a release, a finished move or a cancel; re-read the monitor at least every 50 ms
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
            finally:
                self._waiting -= 1
            return None
        if place is not None and ledger.leave_line(place):
            self._cond.notify_all()                 # the next in line may look for room now
        reservation = ledger.reserve_room(entry, need, victims)
        for victim in victims:
            self._moves.begin_locked(victim, ledger.eviction_target(victim))
        self._moves.begin_locked(entry, Tier.DEVICE)
        return reservation

    def _swap_in(self, entry: Entry, reservation: Reservation, claim: List[str]) -> None:
        """Evict the reservation's victims, then move ``entry`` host -> device; the commit holds the
        requester's lease if it still wants it (``claim``)."""
        for i, victim in enumerate(reservation.victims):
            try:
                self._moves.down(victim, "room")
            except BaseException as exc:
                def undo(rest: List[Entry] = reservation.victims[i + 1:]) -> None:
                    for untouched in rest:
                        self._moves.end_locked(untouched)
                    self._ledger.release_room(reservation)
                error = exc if not isinstance(exc, ModelCacheError) else \
                    BackendError(f"could not make room on the device: {exc}", model=entry.name)
                self._moves.fail(entry, error, "making room", counter=None, undo=undo, cause=exc)
        assert entry.handle is not None and entry.backend is not None
        start = time.perf_counter()
        try:
            entry.backend.to_device(entry.handle)
        except BaseException as exc:
            self._moves.fail(entry, exc, "moving it to the device", undo=lambda: self._ledger.release_room(reservation))
        seconds = time.perf_counter() - start
        self._record.observe("swap_in", seconds)
        with self._cond:
            self._ledger.release_room(reservation)
            entry.swap_in_seconds = seconds
            entry.tier = Tier.DEVICE
            if claim[0] == "wanted" and not entry.removed:
                entry.leases += 1
                claim[0] = "held"
            self._moves.end_locked(entry)
            over = self._ledger.accounted_bytes() > self.device_budget_bytes
        self._events.emit("swap_in", entry.name, Tier.HOST, Tier.DEVICE, entry.device_bytes, seconds)
        if entry.removed:      # unregistered or closed meanwhile: free what the move made
            release_quietly(entry.backend, entry.handle)
            return
        self._moves.settle_host()  # after the move: the model's own host bytes may have left with it
        if over:  # the backend measured more than it estimated: restore the budget (not with this model)
            self._moves.relieve(exclude=entry, measured=True)
        if self._growth.floor is None:
            self._measure_growth()    # the floor, as early as can be: before runtimes grow

    # ------------------------------------------------------------------ moves (lock not held)
    def _step_up(self, entry: Entry, loop: Any = None) -> None:
        """Disk -> host, or unloaded -> host through the loader (an async one awaited on ``loop``,
        the requester's event loop, if given). ``entry.moving`` is set. A disk file that cannot be
        read back (damaged, truncated, deleted) is dropped and the loader runs again, with a log
        line and ``info().last_error`` saying so."""
        start = time.perf_counter()
        handle, kind = entry.handle, "from_disk"
        try:
            if handle is not None:
                assert entry.backend is not None
                try:
                    entry.backend.from_disk(handle)
                except Exception as exc:
                    self._moves.drop_unreadable(entry, exc)
                    handle = None
            if handle is None:
                kind = "load"
                handle = self._load(entry, loop)
        except BaseException as exc:
            loading = kind == "load"
            self._moves.fail(entry, exc, "loading" if loading else "reading it from disk",
                             counter="load_errors" if loading else "errors.move")
        seconds = time.perf_counter() - start
        self._record.observe(kind, seconds)
        with self._cond:
            if kind == "load":
                entry.load_seconds = seconds
            if not entry.removed:          # else unregistered or closed meanwhile: freed below
                entry.handle, entry.tier = handle, handle.tier
            self._moves.end_locked(entry)
        self._events.emit("load", entry.name, "unloaded" if kind == "load" else "disk", handle.tier,
                          handle.host_bytes or handle.device_bytes, seconds)
        if entry.removed and entry.backend is not None:
            release_quietly(entry.backend, handle)

    def _load(self, entry: Entry, loop: Any = None) -> Handle:
        try:
            value = call_loader(entry.loader, loop)
        except Exception as exc:          # KeyboardInterrupt, SystemExit... propagate (Mover.fail)
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

    def check_pressure(self) -> int:
        """Read what runtimes took on the device on their own (:class:`watcher.RuntimeGrowth`;
        it counts against the budget), then evict (policy order) until the accounted bytes fit
        the budget and the device's free memory is at least the reserve. The background watcher
        calls this; returns the number of models evicted."""
        self._measure_growth()
        return self._moves.relieve()

    def _measure_growth(self) -> None:
        """One reading of :class:`watcher.RuntimeGrowth`: the process's device bytes less the
        books (promised room included: a move's memory is within it). The floor comes from a
        reading while nothing moves, right after the backends gave back what their runtimes keep
        without need (the books are exact then): the first once something is on the device
        (right after the first swap-in, or at a later check)."""
        growth, ledger = self._growth, self._ledger
        if growth.floor is None:
            with self._lock:    # the floor: read with the books still (once: NVML takes a millisecond)
                if self._closed or not ledger.quiet() or not any(
                        e.tier is Tier.DEVICE or e.parked_bytes for e in self._entries.values()):
                    return                  # nothing on the device yet, or something moves
                self._reclaim_locked()      # lock released meanwhile
                if not ledger.quiet():
                    return
                process = self.monitor.process_bytes()
                if process:                 # 0: NVML does not list this process (no reading)
                    soft = sum(b.soft_device_bytes() for b in self._backends.values())
                    growth.add(process - self._books_of_device() + soft, clean=True)
            return
        process = self.monitor.process_bytes()
        if not process:
            return
        with self._lock:
            ledger.runtime_bytes = min(growth.add(process - self._books_of_device()), ledger.device_budget // 4)

    def _books_of_device(self) -> int:
        """Lock held: the device bytes this cache and the other live caches of the process account
        for on this cache's device, without what runtimes took on their own."""
        mine = self.monitor
        others = [c for c in list(closing.LIVE) if c is not self and not c._closed and (c.monitor is mine or (
            not mine.simulated and not c.monitor.simulated and c.monitor.device == mine.device))]
        total = 0
        for cache in [self] + others:
            try:            # another cache's read without its lock: a figure, not a plan
                total += cache._ledger.accounted_bytes() - cache._ledger.runtime_bytes
            except RuntimeError:    # pragma: no cover - its entries changed while read
                pass
        return total

    # ------------------------------------------------------------------ other operations
    def prefetch(self, name: str, tier: Tier = Tier.DEVICE,
                 timeout: Optional[float] = _DEFAULT_TIMEOUT) -> "Future[EntryInfo]":
        """Bring ``name`` up to ``tier`` in the background, without holding a lease. The Future
        gives the model's :class:`EntryInfo`, or raises what a ``use()`` would have raised."""
        tier = Tier(tier)
        check_timeout(timeout, name)
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
        return self._moves.evict(name, Tier(tier), Request(timeout))

    def info(self, name: str) -> EntryInfo:
        """A snapshot of ``name``'s state."""
        with self._cond:
            return self._get(name).snapshot()

    def entries(self) -> List[EntryInfo]:
        """Snapshots of every registered model."""
        with self._cond:
            return [e.snapshot() for e in self._entries.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> Dict[str, Union[int, float]]:
        """A flat dict with dotted keys (declared in ``stats.py``); bytes and seconds."""
        return stats_of(self)

    def accounted_bytes(self) -> int:
        """Device bytes the cache counts against its budget now (``stats()``'s
        ``device.accounted_bytes``, without building the rest): one consistent reading, as the
        cache's own planning takes it."""
        with self._lock:
            return self._ledger.accounted_bytes()

    def status(self) -> Dict[str, Any]:
        """``stats()`` plus every entry, JSON-ready (what ``modelcache status --cache FILE`` shows)."""
        return status_of(self)

    def dump_status(self, path: str) -> None:
        """Write :meth:`status` to ``path`` atomically, for ``modelcache status --cache PATH``."""
        atomic_write(path, json.dumps(self.status(), indent=1, default=str).encode())

    def close(self, timeout: Optional[float] = _DEFAULT_TIMEOUT) -> None:
        """Drain, then free every model. New requests get :class:`CacheClosedError` at once; leases
        held and moves in flight have up to ``timeout`` seconds to finish; then every model is
        freed. After the timeout a warning names the leases still held (their models are freed
        anyway: a holder's next run fails), and what a move still in flight makes is freed when it
        ends. Returns within ``timeout`` (plus the time to free the models). Idempotent."""
        closing.close(self, check_timeout(timeout))

    def __enter__(self) -> "ModelCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _get(self, name: str) -> Entry:
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
                backend = self._backends[cls] = cls(BackendContext(self.device, self.monitor, self._disk_space))
            return backend

    def __repr__(self) -> str:
        return (f"ModelCache(device={self.device}, models={len(self._entries)}, "
                f"budget={format_bytes(self.device_budget_bytes)}, policy={self.policy.name!r})")
