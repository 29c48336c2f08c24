"""Moves between tiers, with the cache's lock released while bytes move: the bookkeeping every
move shares (begin, commit, roll back with a typed error its waiters get too) and the moves down
(evictions, demotions below the host, pressure relief).

The way up (load, swap-in) is the request path and stays in ``cache.py``; both call
:meth:`Mover.fail` to roll a move back.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Callable, Deque, List, NoReturn, Optional, TypeVar

from .backends import Backend, Handle
from .config import check_timeout
from .errors import BackendError, ConfigError, LeaseTimeoutError, ModelCacheError, ModelInUseError
from .ledger import Entry
from .tiers import EntryInfo, Tier

if TYPE_CHECKING:  # pragma: no cover
    from .cache import ModelCache

logger = logging.getLogger("modelcache")
T = TypeVar("T")
#: threads waiting for async requests that missed, per cache (more wait in line)
ACQUIRERS = 16


class Mover:
    """Move bookkeeping and moves down for one cache (it reads the cache's lock, ledger and
    recorder). Methods named ``*_locked`` need the cache's lock held; the others must not."""

    def __init__(self, cache: "ModelCache") -> None:
        self._cache = cache
        self._cond = cache._cond
        self._ledger = cache._ledger
        self._record = cache._record
        self._events = cache._events
        self.workers = Workers("modelcache-move")
        #: threads on which async requests that missed wait (``Lease.aacquire``): bounded, so a
        #: burst of misses queues here instead of starting a thread each (hundreds of threads
        #: waking for the GIL starve the event loop); they never wait on one another
        self.acquirers = Workers("modelcache-acquire", max_threads=ACQUIRERS)

    # bookkeeping ---------------------------------------------------------------------------------
    @staticmethod
    def begin_locked(entry: Entry, target: Tier) -> None:
        entry.moving = Future()
        entry.moving_to = target
        entry.move_started = time.perf_counter()

    def end_locked(self, entry: Entry, error: Optional[BaseException] = None) -> None:
        """Finish ``entry``'s move and wake its waiters (they get ``error`` if one is given)."""
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

    def fail(self, entry: Entry, exc: BaseException, doing: str, *, counter: Optional[str] = "errors.move",
             undo: Optional[Callable[[], None]] = None, cause: Optional[BaseException] = None) -> NoReturn:
        """A move of ``entry`` failed: count it, ``undo`` what the move had taken (under the lock),
        end the move with a typed error that its waiters get too, log it and raise it."""
        error = wrap(entry, exc, doing)
        with self._cond:
            if counter is not None:
                self._record.incr(counter)
            source, target = entry.tier, entry.moving_to
            if undo is not None:
                undo()
            self.end_locked(entry, error)
        self._events.emit("error", entry.name, source, target, 0, time.perf_counter() - entry.move_started,
                          reason=doing, error=error)
        if not isinstance(exc, Exception):      # KeyboardInterrupt, SystemExit: the caller gets it
            raise exc
        cause = cause if cause is not None else exc
        if error is cause:
            raise error
        raise error from cause

    def run(self, move: Callable[[], None], entry: Entry, request: Request) -> None:
        """Run ``move`` (which ends ``entry``'s move): in this thread for a request without a
        deadline; else on a worker thread (:class:`Workers`), waiting at most until the deadline. A
        move that outlasts it goes on (the next request finds its result) and the caller gets
        :class:`LeaseTimeoutError` in time. What the move raised is raised here, an interrupt
        (``KeyboardInterrupt``) too; a request whose caller gave up gets :class:`Cancelled`."""
        if request.deadline is None and request.cancelled is None:
            move()
            return
        moving = entry.moving
        assert moving is not None
        raised: List[BaseException] = []
        done = threading.Event()

        def body() -> None:
            try:
                move()
            except BaseException as exc:     # its waiters got a typed error through the move's Future
                raised.append(exc)
            finally:
                done.set()
        self.workers.start(body)
        try:
            request.result(moving, entry.name, "its move goes on in the background, and a later request "
                                               "will find it done")
        except (LeaseTimeoutError, Cancelled):
            raise
        except BaseException as waited:
            done.wait()
            if raised and raised[0] is not waited:   # an interrupt: here as itself, not as the waiters' error
                raise raised[0]
            raise
        done.wait(request.left())
        if raised and not isinstance(raised[0], Exception):
            raise raised[0]

    def drop_unreadable(self, entry: Entry, exc: Exception) -> None:
        """``entry``'s disk file could not be read back: drop it (the loader will run again)."""
        assert entry.handle is not None and entry.backend is not None
        logger.warning("modelcache: model %r: its disk-tier file cannot be read back (%s); it is dropped and the "
                       "loader runs again", entry.name, exc)
        release_quietly(entry.backend, entry.handle)
        with self._cond:
            entry.handle, entry.tier = None, Tier.UNLOADED
            entry.last_error = f"disk-tier file dropped: {exc}"
            self._record.incr("errors.disk")

    # moves down ----------------------------------------------------------------------------------
    def down(self, entry: Entry, reason: str) -> None:
        """Move ``entry`` down to ``entry.moving_to`` (set by the planner), a step at a time,
        committing after each step. Raises; the entry then stays where it got to."""
        target = entry.moving_to
        assert entry.handle is not None and entry.backend is not None and target is not None
        backend, handle, record = entry.backend, entry.handle, self._record
        source, freed = handle.tier, (handle.device_bytes if handle.tier is Tier.DEVICE else handle.host_bytes)
        try:
            if handle.tier is Tier.HOST and target is Tier.HOST:   # a parked model: free what it keeps
                backend.unpark(handle)
                record.incr("unparks")
            if handle.tier is Tier.DEVICE:
                if target is not Tier.UNLOADED:   # unloading frees the device directly
                    start = time.perf_counter()
                    backend.to_host(handle)
                    record.observe("swap_out", time.perf_counter() - start)
                    if entry.unpark_after and target is Tier.HOST:
                        backend.unpark(handle)
                        record.incr("unparks")
                record.incr("evictions")
                record.incr(f"evictions.{reason}")
            if target is Tier.DISK and handle.tier is not Tier.DISK:
                with self._cond:                  # the device bytes are gone: let planners see it
                    entry.tier, entry.evicting_for = handle.tier, None
                    self._cond.notify_all()
                start = time.perf_counter()
                try:
                    backend.to_disk(handle, self._disk_dir())
                    record.observe("to_disk", time.perf_counter() - start)
                    record.incr("demotions.disk")
                except Exception as exc:          # full, read-only, unpicklable: unload instead
                    logger.warning("modelcache: model %r: the disk tier cannot take it (%s: %s); it is "
                                   "unloaded instead (its loader runs again when it is used)",
                                   entry.name, type(exc).__name__, exc)
                    entry.last_error = f"disk tier failed, unloaded instead: {type(exc).__name__}: {exc}"
                    record.incr("errors.disk")
                    target = Tier.UNLOADED
            if target is Tier.UNLOADED and handle.tier is not Tier.UNLOADED:
                backend.release(handle)
                record.incr("demotions.unloaded")
        except BaseException as exc:
            self.fail(entry, exc, f"moving it to {target}", undo=lambda: setattr(entry, "tier", handle.tier))
        with self._cond:
            entry.tier = handle.tier
            if entry.tier is Tier.UNLOADED:
                entry.handle = None
            self.end_locked(entry)
        self._events.emit("eviction" if source is Tier.DEVICE else "demotion", entry.name, source, handle.tier,
                          freed, time.perf_counter() - entry.move_started, reason)
        if entry.removed and entry.handle is not None:     # unregistered or closed meanwhile
            release_quietly(backend, handle)

    def evict(self, name: str, tier: Tier, request: "Request") -> EntryInfo:
        """``ModelCache.evict``: wait for a move in flight, then move ``name`` down to ``tier``."""
        cache = self._cache
        if tier is Tier.DEVICE:
            raise ConfigError("evict(tier=Tier.DEVICE) is not a move down; use prefetch()", model=name)
        if tier is Tier.DISK and cache.disk_dir is None:
            raise ConfigError("evict(tier=Tier.DISK) needs the cache's disk_dir", model=name)
        while True:
            with self._cond:
                entry = cache._get(name)
                moving = entry.moving
                if moving is None:
                    if entry.tier >= tier:
                        return entry.snapshot()
                    if entry.leases:
                        raise ModelInUseError(f"cannot evict: {entry.leases} lease(s) held", model=name)
                    if tier is Tier.DISK and not (entry.backend and entry.backend.supports_disk):
                        raise ConfigError(f"the {entry.backend and entry.backend.name} backend has no "
                                          f"disk tier", model=name)
                    self.begin_locked(entry, tier)
            if moving is not None:
                cache._wait_move(entry, moving, request, up=False)
                continue
            self.down(entry, "explicit")
            self.settle_host()
            return cache.info(name)

    def all_down(self, victims: List[Entry], reason: str) -> int:
        """Move each victim down (its target set by the planner); returns how many moved. A
        failure is logged and counted, and leaves that model where it got to."""
        moved = 0
        for victim in victims:
            with contextlib.suppress(ModelCacheError):
                self.down(victim, reason)
                moved += 1
        return moved

    def settle_host(self, keep: Optional[Entry] = None) -> None:
        """Demote parked models (policy order) to disk or unloaded while the host budget is exceeded."""
        with self._cond:
            if self._cache._closed:
                return
            victims = self._ledger.host_victims(keep)
            for victim in victims:
                self.begin_locked(victim, self._ledger.below_host(victim))
        self.all_down(victims, "host")

    def relieve(self, exclude: Optional[Entry] = None, *, measured: bool = False) -> int:
        """Evict (policy order) until the accounted bytes fit the budget and the device's free
        memory is at least the reserve; returns the number of models evicted. ``measured``: the
        excess is a model measured larger than planned, not memory pressure: shared memory that is
        costly to make again (a session) is kept while runs in flight would make the room when
        they end (the next swap-in that needs room evicts then)."""
        with self._cond:
            if self._cache._closed:
                return 0
            victims, _ = self._ledger.pick_victims(0, exclude, self._cache.monitor.free_bytes(),  # enough or not
                                                   0.0 if measured else None)
            for victim in victims:
                self._cache.policy.on_evict(victim.candidate(victim.device_bytes))
                self.begin_locked(victim, self._ledger.eviction_target(victim))
        evicted = self.all_down(victims, "pressure")
        if victims:
            self.settle_host()
        return evicted

    def _disk_dir(self) -> str:
        if self._cache._disk_space is None:
            raise ConfigError("the disk tier needs the cache's disk_dir")
        return self._cache._disk_space


def wrap(entry: Entry, exc: BaseException, doing: str) -> ModelCacheError:
    """``exc`` as a :class:`ModelCacheError` naming ``entry``'s model."""
    if isinstance(exc, ModelCacheError):
        if exc.model is None:
            exc.model = entry.name
        return exc
    if not isinstance(exc, Exception):     # an interrupt: the move's other waiters get this error
        return BackendError(f"interrupted by {type(exc).__name__} while {doing}", model=entry.name)
    return BackendError(f"{type(exc).__name__} while {doing}: {exc}", model=entry.name)


def call_loader(loader: Any, loop: Optional[asyncio.AbstractEventLoop] = None) -> Any:
    """A loader is called if callable (torch modules and tensors count as values), else returned;
    what an ``async def`` loader returns is awaited (see :func:`run_awaitable`)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(loader, (torch.nn.Module, torch.Tensor)):
        return loader
    value = loader() if callable(loader) else loader
    return run_awaitable(value, loop) if inspect.isawaitable(value) else value


def run_awaitable(awaitable: Any, loop: Optional[asyncio.AbstractEventLoop] = None) -> Any:
    """Await ``awaitable`` from a thread that is not async: on ``loop`` (the event loop of the
    request that started the load) while it runs in another thread, so that the loader may use
    that loop's resources; else on a new loop in this thread; else (this thread runs a loop: a
    synchronous ``use()`` called from async code) on a new loop in a thread of its own."""
    async def wrapped() -> Any:
        return await awaitable
    if loop is not None and loop.is_running() and not _runs_here(loop):
        return asyncio.run_coroutine_threadsafe(wrapped(), loop).result()
    if not _loop_runs_here():
        return asyncio.run(wrapped())
    out: List[Any] = []

    def apart() -> None:
        try:
            out.append((True, asyncio.run(wrapped())))
        except BaseException as exc:            # re-raised in the caller's thread
            out.append((False, exc))
    thread = threading.Thread(target=apart, name="modelcache-async-loader", daemon=True)
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def _loop_runs_here() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _runs_here(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def release_quietly(backend: Backend, handle: Handle) -> None:
    try:
        backend.release(handle)
    except Exception:
        logger.exception("modelcache: releasing %r failed", handle.name)


class Cancelled(Exception):
    """Raised in the thread acquiring for an async request whose caller gave up (cancelled): its
    place in line is given back; a move it started goes on for the next request."""


class Request:
    """One acquisition's waiting state: its timeout and deadline, its place in the line for room
    (and since when), and, for an async request, the event its caller sets on giving up."""

    __slots__ = ("timeout", "deadline", "place", "since", "cancelled", "loop")

    def __init__(self, timeout: Optional[float], cancelled: Optional[threading.Event] = None,
                 loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self.timeout = timeout
        self.loop = loop                      #: the requester's event loop: async loaders are awaited on it
        self.deadline = make_deadline(timeout)
        self.place: Optional[object] = None   #: its place in the line for room, once it waits
        self.since = 0.0                      #: monotonic time it started waiting for room
        self.cancelled = cancelled

    def left(self) -> Optional[float]:
        """Seconds until the deadline (None: no deadline)."""
        return time_left(self.deadline)

    def waited_s(self) -> float:
        """Seconds it has waited for room so far."""
        return time.monotonic() - self.since if self.place is not None else 0.0

    def check(self) -> None:
        """Raise :class:`Cancelled` if the caller gave up."""
        if self.cancelled is not None and self.cancelled.is_set():
            raise Cancelled()

    def result(self, future: "Future[Any]", name: str, what: str) -> Any:
        """``future.result()`` until the deadline; after it, :class:`LeaseTimeoutError` for model
        ``name`` saying ``what`` (the wait, or what happens to the work). An async request looks
        every 50 ms whether its caller gave up."""
        try:
            if self.cancelled is None:
                return future.result(timeout=self.left())
            while True:
                self.check()
                left = self.left()
                try:
                    return future.result(timeout=0.05 if left is None else min(left, 0.05))
                except FutureTimeout:
                    if left is not None and left <= 0.05:
                        raise
        except FutureTimeout:
            raise LeaseTimeoutError(f"not ready after {self.timeout} s: {what}", model=name) from None


def make_deadline(timeout: Optional[float]) -> Optional[float]:
    timeout = check_timeout(timeout)
    return None if timeout is None else time.monotonic() + timeout


def time_left(at: Optional[float]) -> Optional[float]:
    return None if at is None else max(0.0, at - time.monotonic())


class Workers:
    """Threads for moves that run apart from their caller, kept for the next one: an idle thread
    is reused, a new one starts only when none is idle, and one idle for ``idle_s`` seconds ends.
    A thread per move would leave the per-thread state of CUDA and the runtimes (a copy stream,
    the runtime's thread state: about 0.5 MiB of device memory each, measured on the H100) behind
    each time; reused threads keep it bounded by the moves in flight at once.

    ``max_threads`` (None: no limit) bounds the threads running at once; jobs beyond it wait, in
    the order they came, for a thread to finish its job (threads that wait on each other's jobs
    must not share a bounded pool)."""

    def __init__(self, label: str, idle_s: float = 30.0, max_threads: Optional[int] = None) -> None:
        self._label = label
        self._idle_s = idle_s
        self._max = max_threads
        self._lock = threading.Lock()
        self._idle: List["queue.SimpleQueue[Optional[Callable[[], None]]]"] = []
        self._pending: Deque[Callable[[], None]] = collections.deque()
        self._started = 0
        self._alive = 0
        self._busy = 0

    def start(self, job: Callable[[], None]) -> None:
        """Run ``job`` (which handles its own errors) on an idle thread, or a new one (or, with
        every allowed thread busy, once one is free)."""
        with self._lock:
            self._busy += 1
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                if self._max is not None and self._alive >= self._max:
                    self._pending.append(job)
                    return
                self._started += 1
                self._alive += 1
                number = self._started
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._loop, args=(inbox,), name=f"{self._label}-{number}", daemon=True).start()
        inbox.put(job)

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        """Run ``fn`` on a worker; its result or error through the returned Future."""
        future: "Future[T]" = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:         # the Future's holder gets it
                future.set_exception(exc)
        self.start(job)
        return future

    def _loop(self, inbox: "queue.SimpleQueue[Optional[Callable[[], None]]]") -> None:
        job: Optional[Callable[[], None]] = None
        while True:
            if job is None:
                try:
                    job = inbox.get(timeout=self._idle_s)
                except queue.Empty:
                    with self._lock:
                        if inbox in self._idle:      # still idle: end
                            self._idle.remove(inbox)
                            self._alive -= 1
                            return
                    job = inbox.get()                # taken by start() just now: its job is on the way
            if job is None:
                with self._lock:
                    self._alive -= 1
                return
            try:
                job()
            except BaseException:                # pragma: no cover - jobs report their own errors
                logger.exception("modelcache: a background move raised")
            with self._lock:
                self._busy -= 1
                job = self._pending.popleft() if self._pending else None
                if job is None:
                    self._idle.append(inbox)

    def busy(self) -> int:
        """Jobs started and not yet finished."""
        with self._lock:
            return self._busy

    def threads(self) -> int:
        """Threads started so far (for tests: reuse keeps this at the moves in flight at once)."""
        with self._lock:
            return self._started

    def stop(self) -> None:
        """End the idle threads (busy ones end when idle for ``idle_s``)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)
