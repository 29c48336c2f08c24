"""``@cache.model`` and ``@cache.multiplexed``: loaders turned into functions that return leases.

Loaders may be plain functions or ``async def`` ones (awaited on the event loop of the request that
loads them, or on a loop of their own). What the decorated function returns is a :class:`Lease`:
``with load(...) as model`` and ``async with load(...) as model`` both work.
"""
from __future__ import annotations

import collections
import functools
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Pattern, Type, Union

from .backends import Backend, backend_class
from .errors import ConfigError, DuplicateModelError, ModelCacheError, ModelNotFoundError
from .lease import Lease
from .sizes import Size, parse_size

if TYPE_CHECKING:  # pragma: no cover
    from .cache import ModelCache

DEFAULT_TIMEOUT = 30.0

#: what a model id may not contain by default: it often becomes a path (``f"models/{id}.onnx"``)
_UNSAFE = re.compile(r"(^|[/\\])\.\.($|[/\\])|[/\\\x00]")

IdCheck = Union[None, str, Pattern[str], Callable[[str], bool]]


def model(cache: "ModelCache", name: str, backend: Union[str, Type[Backend]], size_hint: Optional[Size],
          pinned: bool, options: Dict[str, Any]) -> Callable[[Callable[[], Any]], Callable[..., Lease]]:
    """See :meth:`ModelCache.model`."""
    def decorate(fn: Callable[[], Any]) -> Callable[..., Lease]:
        cache._register(name, fn, backend, size_hint, pinned, options, owner=fn)

        @functools.wraps(fn)
        def lease(timeout: Optional[float] = DEFAULT_TIMEOUT) -> Lease:
            return cache.use(name, timeout)

        lease.model_name = name  # type: ignore[attr-defined]
        lease.cache = cache      # type: ignore[attr-defined]
        return lease
    return decorate


def multiplexed(cache: "ModelCache", backend: Union[str, Type[Backend]], prefix: str, size_hint: Optional[Size],
                pinned: bool, max_models: Optional[int], check_id: IdCheck,
                options: Dict[str, Any]) -> Callable[[Callable[[str], Any]], Callable[..., Lease]]:
    """See :meth:`ModelCache.multiplexed`. Arguments are checked here, at decoration."""
    if backend != "auto":
        backend_class(backend)
    if size_hint is not None:
        parse_size(size_hint, what="size_hint")
    if not isinstance(pinned, bool):
        raise ConfigError(f"pinned={pinned!r} must be True or False")
    if max_models is not None and (isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 1):
        raise ConfigError(f"max_models={max_models!r} must be a whole number >= 1, or None for no limit")
    if not isinstance(prefix, str):
        raise ConfigError(f"prefix={prefix!r} must be a string")
    accept = _id_checker(check_id)

    def decorate(fn: Callable[[str], Any]) -> Callable[..., Lease]:
        used: "collections.OrderedDict[str, None]" = collections.OrderedDict()   # ids, least recent first
        lock = threading.Lock()

        def ensure(model_id: str) -> str:
            """Register ``model_id`` if needed, mark it used, and unregister the least recently used
            unleased ids beyond ``max_models``."""
            name = prefix + model_id
            owner = _owner(cache, name)
            if owner is None:
                try:
                    cache._register(name, functools.partial(fn, model_id), backend, size_hint, pinned, options,
                                    owner=fn)
                    owner = fn
                except DuplicateModelError:
                    owner = _owner(cache, name)   # registered by a concurrent call
            if owner is not fn:
                raise DuplicateModelError("already registered by something other than this multiplexed loader",
                                          model=name)
            with lock:
                used[model_id] = None
                used.move_to_end(model_id)
                over = len(used) - max_models if max_models is not None else 0
                candidates = [old for old in used if old != model_id] if over > 0 else []
            for old in candidates:                      # least recently used first
                if over <= 0:
                    break
                try:
                    cache.unregister(prefix + old, timeout=0)    # refused while leased or moving
                except ModelNotFoundError:
                    pass                                        # unregistered by someone else
                except ModelCacheError:
                    continue
                with lock:
                    if old in used:
                        del used[old]
                        over -= 1
            return name

        @functools.wraps(fn)
        def lease(model_id: str, timeout: Optional[float] = DEFAULT_TIMEOUT) -> Lease:
            if not isinstance(model_id, str) or not model_id:
                raise ConfigError(f"model_id={model_id!r} must be a non-empty string")
            if not accept(model_id):
                raise ConfigError(f"model_id={model_id!r} refused by the id check ({_describe(check_id)})",
                                  model=prefix + model_id)
            return _MultiplexedLease(cache, ensure(model_id), timeout, lambda: ensure(model_id))

        lease.cache = cache  # type: ignore[attr-defined]
        lease.model_ids = lambda: list(used)  # type: ignore[attr-defined]
        return lease
    return decorate


class _MultiplexedLease(Lease):
    """A lease on a multiplexed id: if the id was unregistered (beyond ``max_models``) between the
    call and the acquisition, it is registered again."""

    __slots__ = ("_ensure",)

    def __init__(self, cache: "ModelCache", name: str, timeout: Optional[float], ensure: Callable[[], str]) -> None:
        super().__init__(cache, name, timeout)
        self._ensure = ensure

    def acquire(self) -> Any:
        try:
            return super().acquire()
        except ModelNotFoundError:
            self._ensure()
            return super().acquire()

    async def aacquire(self) -> Any:
        try:
            return await super().aacquire()
        except ModelNotFoundError:
            self._ensure()
            return await super().aacquire()


def _id_checker(check: IdCheck) -> Callable[[str], bool]:
    """``check_id`` as a predicate: None refuses path separators, ``..`` and NUL; a string or
    compiled pattern must match the whole id; a callable returns whether the id is accepted."""
    if check is None:
        return lambda model_id: _UNSAFE.search(model_id) is None and model_id not in (".", "..")
    if isinstance(check, str):
        try:
            check = re.compile(check)
        except re.error as exc:
            raise ConfigError(f"check_id={check!r} is not a valid regular expression: {exc}") from None
    if isinstance(check, re.Pattern):
        pattern = check
        return lambda model_id: pattern.fullmatch(model_id) is not None
    if callable(check):
        return lambda model_id: bool(check(model_id))    # type: ignore[operator]
    raise ConfigError(f"check_id={check!r} must be None, a regular expression or a callable returning a bool")


def _describe(check: IdCheck) -> str:
    if check is None:
        return f"the default refuses {os.sep!r}, '\\\\', '..' and NUL"
    pattern = getattr(check, "pattern", check)
    return f"must match {pattern!r}" if isinstance(pattern, str) else f"{getattr(check, '__name__', check)!r} said no"


def _owner(cache: "ModelCache", name: str) -> Any:
    """What registered ``name`` (a decorated loader), or None if nothing did."""
    entry = cache._entries.get(name)
    return None if entry is None else entry.owner
