"""A lease: a model held resident on the device while it is held (``ModelCache.use``).

``Lease`` is generic in the model it hands out: ``cache.use(name)`` gives a ``Lease[Any]``; the
functions made by ``@cache.model`` and ``@cache.multiplexed`` give leases typed from their loader
or backend (see ``decorators.py``)."""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Generic, Optional, TypeVar

from .errors import ModelCacheError
from .moves import Request
from .tiers import Tier

if TYPE_CHECKING:  # pragma: no cover
    from .cache import ModelCache
    from .ledger import Entry

logger = logging.getLogger("modelcache")
_getframe = sys._getframe
_DEVICE = Tier.DEVICE


def _held_already(name: str) -> ModelCacheError:
    return ModelCacheError("this lease is already held (or being acquired); release it first", model=name)

#: the type of the model a lease hands out
M = TypeVar("M", covariant=True)


class Lease(Generic[M]):
    """A model held resident on the device while the lease is held. Use as a context manager
    (``with cache.use(name) as model``, or ``async with`` in async code) or call :meth:`acquire`
    (:meth:`aacquire`) and :meth:`release`.

    Thread-safe: of two threads acquiring one lease, one gets it and the other an error; a release
    gives back what one acquire took, however often it is called. A lease garbage-collected while
    held is released, with a warning naming the model and where it was acquired."""

    __slots__ = ("_cache", "name", "timeout", "allow_host", "_entry", "_model", "hit", "waited", "_free",
                 "_where")

    def __init__(self, cache: "ModelCache", name: str, timeout: Optional[float], allow_host: bool = False) -> None:
        self._cache, self.name, self.timeout, self.allow_host = cache, name, timeout, allow_host
        self._entry: Optional[Entry] = None
        self._model: Any = None
        self._free = [True]               # one token: taking it (list.pop, atomic) claims the lease
        self.hit: Optional[bool] = None   #: after acquire: True if the model was already on the device
        self.waited = False               #: after acquire: True if it waited for room on the device

    def acquire(self) -> M:
        """Make the model resident (waiting up to ``timeout`` seconds) and return it."""
        try:
            token = self._free.pop()                   # of two threads acquiring it, one gets it
        except IndexError:
            raise _held_already(self.name) from None
        try:
            entry, self._model, self.hit, self.waited = self._cache._acquire(
                self.name, self.timeout, True, _DEVICE, self.allow_host)
        except BaseException:
            self._free.append(token)
            raise
        caller = _getframe(1)                          # the user's code (also through ``with``)
        self._where = (caller.f_code, caller.f_lineno)  # formatted only if it is ever needed
        self._entry = entry
        model: M = self._model   # what the backend hands out, typed by the lease's parameter
        return model

    async def aacquire(self) -> M:
        """:meth:`acquire` for async code: a hit is served here at once; otherwise the cache's
        worker threads wait (never the event loop's default executor) while this awaits them.
        Cancelled, the request gives its place in line back at once; a move it started goes on
        for a later request."""
        try:
            token = self._free.pop()
        except IndexError:
            raise _held_already(self.name) from None
        caller = _getframe(1)
        try:
            got = self._cache._try_hit(self.name)
            if got is not None:
                entry, self._model = got
                self.hit, self.waited = True, False
            else:
                entry, self._model, self.hit, self.waited = await self._wait_for_it()
        except BaseException:
            self._free.append(token)
            raise
        self._where = (caller.f_code, caller.f_lineno)
        self._entry = entry
        model: M = self._model
        return model

    async def _wait_for_it(self) -> Any:
        cache = self._cache
        request = Request(self.timeout, threading.Event(), asyncio.get_running_loop())
        future = cache._moves.acquirers.submit(
            lambda: cache._acquire(self.name, self.timeout, lease=True, allow_host=self.allow_host, request=request))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            assert request.cancelled is not None
            request.cancelled.set()
            cache._leave_line(request, wake=True)

            def give_back(done: "Future[Any]") -> None:   # acquired after all: released at once
                if not done.cancelled() and done.exception() is None:
                    cache._release(done.result()[0])
            future.add_done_callback(give_back)
            raise

    def release(self, *_exc: object) -> None:
        """Give the lease back (idempotent)."""
        entry, self._entry, self._model = self._entry, None, None
        if entry is not None:
            self._cache._release(entry)
            self._free.append(True)

    def __del__(self) -> None:
        if getattr(self, "_entry", None) is not None:
            code, line = self._where
            logger.warning("modelcache: a lease on %r acquired at %s:%s was dropped without release(); releasing it",
                           self.name, code.co_filename, line)
            try:
                self.release()
            except Exception:       # the cache may be gone at interpreter exit
                pass

    @property
    def held(self) -> bool:
        return self._entry is not None

    @property
    def model(self) -> M:
        """The model, while the lease is held."""
        if self._entry is None:
            raise ModelCacheError("the lease is not held", model=self.name)
        model: M = self._model
        return model

    # no wrapper: this is the hit path of every ``with cache.use(...)`` (a subclass that overrides
    # acquire binds ``__enter__`` to its own)
    __enter__ = acquire
    __exit__ = release

    async def __aenter__(self) -> M:
        return await self.aacquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.name!r}, held={self.held})"
