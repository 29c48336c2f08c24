"""A lease: a model held resident on the device while it is held (``ModelCache.use``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from .errors import ModelCacheError

if TYPE_CHECKING:  # pragma: no cover
    from .cache import ModelCache
    from .ledger import Entry


class Lease:
    """A model held resident on the device while the lease is held. Use as a context manager
    (``with cache.use(name) as model``) or call :meth:`acquire` and :meth:`release`."""

    __slots__ = ("_cache", "name", "timeout", "allow_host", "_entry", "_model", "hit", "waited")

    def __init__(self, cache: "ModelCache", name: str, timeout: Optional[float], allow_host: bool = False) -> None:
        self._cache, self.name, self.timeout, self.allow_host = cache, name, timeout, allow_host
        self._entry: Optional[Entry] = None
        self._model: Any = None
        self.hit: Optional[bool] = None   #: after acquire: True if the model was already on the device
        self.waited = False               #: after acquire: True if it waited for room on the device

    def acquire(self) -> Any:
        """Make the model resident (waiting up to ``timeout`` seconds) and return it."""
        if self._entry is not None:
            raise ModelCacheError("this lease is already held; release it first", model=self.name)
        self._entry, self._model, self.hit, self.waited = self._cache._acquire(
            self.name, self.timeout, lease=True, allow_host=self.allow_host)
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
