"""``@cache.model`` and ``@cache.multiplexed``: loaders turned into functions that return leases."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Type, Union

from .backends import Backend
from .errors import ConfigError, DuplicateModelError
from .sizes import Size

if TYPE_CHECKING:  # pragma: no cover
    from .cache import Lease, ModelCache

DEFAULT_TIMEOUT = 30.0


def model(cache: "ModelCache", name: str, backend: Union[str, Type[Backend]], size_hint: Optional[Size],
          pinned: bool, options: Dict[str, Any]) -> Callable[[Callable[[], Any]], Callable[..., "Lease"]]:
    """See :meth:`ModelCache.model`."""
    def decorate(fn: Callable[[], Any]) -> Callable[..., "Lease"]:
        cache._register(name, fn, backend, size_hint, pinned, options, owner=fn)

        @functools.wraps(fn)
        def lease(timeout: Optional[float] = DEFAULT_TIMEOUT) -> "Lease":
            return cache.use(name, timeout)

        lease.model_name = name  # type: ignore[attr-defined]
        lease.cache = cache      # type: ignore[attr-defined]
        return lease
    return decorate


def multiplexed(cache: "ModelCache", backend: Union[str, Type[Backend]], prefix: str, size_hint: Optional[Size],
                options: Dict[str, Any]) -> Callable[[Callable[[str], Any]], Callable[..., "Lease"]]:
    """See :meth:`ModelCache.multiplexed`."""
    def decorate(fn: Callable[[str], Any]) -> Callable[..., "Lease"]:
        @functools.wraps(fn)
        def lease(model_id: str, timeout: Optional[float] = DEFAULT_TIMEOUT) -> "Lease":
            if not isinstance(model_id, str) or not model_id:
                raise ConfigError(f"model_id={model_id!r} must be a non-empty string")
            name = prefix + model_id
            owner = _owner(cache, name)
            if owner is None:
                try:
                    cache._register(name, functools.partial(fn, model_id), backend, size_hint, False, options,
                                    owner=fn)
                    owner = fn
                except DuplicateModelError:
                    owner = _owner(cache, name)   # registered by a concurrent call
            if owner is not fn:
                raise DuplicateModelError("already registered by something other than this multiplexed loader",
                                          model=name)
            return cache.use(name, timeout)

        lease.cache = cache  # type: ignore[attr-defined]
        return lease
    return decorate


def _owner(cache: "ModelCache", name: str) -> Any:
    """What registered ``name`` (a decorated loader), or None if nothing did."""
    entry = cache._entries.get(name)
    return None if entry is None else entry.owner
