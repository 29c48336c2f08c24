"""``@cache.model`` and ``@cache.multiplexed``: loaders turned into functions that return leases.

Loaders may be plain functions or ``async def`` ones (awaited on the event loop of the request that
loads them, or on a loop of their own). What the decorated function returns is a :class:`Lease`:
``with load(...) as model`` and ``async with load(...) as model`` both work.

Types: the lease is typed by what it hands out. With ``backend="onnxruntime"`` that is an
``OrtModel``, with ``"tensorrt"`` a ``TrtModel``; with ``"python"`` or ``"auto"`` (the default) it is
what the loader returns (awaited, for an ``async def`` loader). A loader returning what ``"auto"``
may give another backend (a path, bytes, an ONNX ``ModelProto``, an ONNX Runtime session, a
TensorRT engine) gives ``Lease[Any]``, as ``cache.use(name)`` does, and so does a backend class or
any other backend name. A backend of your own registered with ``register_backend(..., auto=True)``
may take other values under ``"auto"``: name it (``backend=...``) where the type matters.
"""
from __future__ import annotations

import collections
import functools
import os
import re
import threading
from typing import (TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Literal, Optional, Pattern, Protocol, Type,
                    TypeVar, Union, cast, overload)

from .backends import Backend, backend_class
from .errors import ConfigError, DuplicateModelError, ModelCacheError, ModelNotFoundError
from .lease import Lease
from .sizes import Size, parse_size

if TYPE_CHECKING:  # pragma: no cover
    from .backends.onnxruntime.model import OrtModel
    from .backends.tensorrt.runtime import TrtModel
    from .cache import ModelCache

DEFAULT_TIMEOUT = 30.0

#: what a model id may not contain by default: it often becomes a path (``f"models/{id}.onnx"``)
_UNSAFE = re.compile(r"(^|[/\\])\.\.($|[/\\])|[/\\\x00]")

IdCheck = Union[None, str, Pattern[str], Callable[[str], bool]]

M = TypeVar("M")
M_co = TypeVar("M_co", covariant=True)


class ModelFunction(Protocol[M_co]):
    """What ``@cache.model(name)`` makes of a loader: ``load(timeout=30.0)`` returns a lease on
    the model (``with load() as model``)."""

    __name__: str
    model_name: str            #: the name it registered
    cache: "ModelCache"

    def __call__(self, timeout: Optional[float] = DEFAULT_TIMEOUT) -> Lease[M_co]: ...


class MultiplexedFunction(Protocol[M_co]):
    """What ``@cache.multiplexed()`` makes of a loader: ``load(model_id, timeout=30.0)`` registers
    ``prefix + model_id`` if needed and returns a lease on it."""

    __name__: str
    cache: "ModelCache"

    #: the ids registered through this function, least recently used first
    model_ids: Callable[[], List[str]]

    def __call__(self, model_id: str, timeout: Optional[float] = DEFAULT_TIMEOUT) -> Lease[M_co]: ...


class _OnnxModelLike(Protocol):        # onnx.ModelProto
    ir_version: int
    opset_import: Any


class _OrtSessionLike(Protocol):       # onnxruntime.InferenceSession
    def get_providers(self) -> Any: ...


class _TrtEngineLike(Protocol):        # tensorrt.ICudaEngine
    def create_execution_context(self, *args: Any) -> Any: ...


#: what a loader may return that ``backend="auto"`` may hand to another backend than "python"
_NotOnlyPython = Union[str, "os.PathLike[str]", bytes, bytearray, _OnnxModelLike, _OrtSessionLike, _TrtEngineLike]


class ModelDecorator(Protocol):
    """``@cache.model(name)`` with backend "auto" or "python": the lease hands out what the loader
    returns (see the module docstring for when that is ``Any``)."""

    @overload
    def __call__(self, fn: Callable[[], Awaitable[_NotOnlyPython]]) -> ModelFunction[Any]: ...
    @overload
    def __call__(self, fn: Callable[[], Awaitable[M]]) -> ModelFunction[M]: ...
    @overload
    def __call__(self, fn: Callable[[], _NotOnlyPython]) -> ModelFunction[Any]: ...
    @overload
    def __call__(self, fn: Callable[[], M]) -> ModelFunction[M]: ...


class MultiplexedDecorator(Protocol):
    """``@cache.multiplexed()`` with backend "auto" or "python": the lease hands out what the
    loader returns (see the module docstring for when that is ``Any``)."""

    @overload
    def __call__(self, fn: Callable[[str], Awaitable[_NotOnlyPython]]) -> MultiplexedFunction[Any]: ...
    @overload
    def __call__(self, fn: Callable[[str], Awaitable[M]]) -> MultiplexedFunction[M]: ...
    @overload
    def __call__(self, fn: Callable[[str], _NotOnlyPython]) -> MultiplexedFunction[Any]: ...
    @overload
    def __call__(self, fn: Callable[[str], M]) -> MultiplexedFunction[M]: ...


class Decorators:
    """:meth:`model` and :meth:`multiplexed`, the decorators of :class:`ModelCache` (which derives
    from this class; they are typed here, per backend)."""

    @overload
    def model(self, name: str, *, backend: Literal["onnxruntime"], size_hint: Optional[Size] = None,
              pinned: bool = False, **options: Any) -> Callable[[Callable[[], object]], ModelFunction[OrtModel]]: ...
    @overload
    def model(self, name: str, *, backend: Literal["tensorrt"], size_hint: Optional[Size] = None,
              pinned: bool = False, **options: Any) -> Callable[[Callable[[], object]], ModelFunction[TrtModel]]: ...
    @overload
    def model(self, name: str, *, backend: Literal["auto", "python"] = "auto", size_hint: Optional[Size] = None,
              pinned: bool = False, **options: Any) -> ModelDecorator: ...
    @overload
    def model(self, name: str, *, backend: Union[str, Type[Backend]], size_hint: Optional[Size] = None,
              pinned: bool = False, **options: Any) -> Callable[[Callable[[], object]], ModelFunction[Any]]: ...

    def model(self, name: str, *, backend: Union[str, Type[Backend]] = "auto", size_hint: Optional[Size] = None,
              pinned: bool = False, **options: Any) -> Callable[[Callable[[], Any]], ModelFunction[Any]]:
        """Register the decorated loader under ``name``; calling the result returns a lease::

            @cache.model("bert", backend="onnxruntime")
            def load_bert(): return "models/bert.onnx"
            with load_bert() as session: ...
        """
        return model(cast("ModelCache", self), name, backend, size_hint, pinned, options)   # the function below

    @overload
    def multiplexed(self, *, backend: Literal["onnxruntime"], prefix: str = "", size_hint: Optional[Size] = None,
                    pinned: bool = False, max_models: Optional[int] = None, check_id: IdCheck = None,
                    **options: Any) -> Callable[[Callable[[str], object]], MultiplexedFunction[OrtModel]]: ...
    @overload
    def multiplexed(self, *, backend: Literal["tensorrt"], prefix: str = "", size_hint: Optional[Size] = None,
                    pinned: bool = False, max_models: Optional[int] = None, check_id: IdCheck = None,
                    **options: Any) -> Callable[[Callable[[str], object]], MultiplexedFunction[TrtModel]]: ...
    @overload
    def multiplexed(self, *, backend: Literal["auto", "python"] = "auto", prefix: str = "",
                    size_hint: Optional[Size] = None, pinned: bool = False, max_models: Optional[int] = None,
                    check_id: IdCheck = None, **options: Any) -> MultiplexedDecorator: ...
    @overload
    def multiplexed(self, *, backend: Union[str, Type[Backend]], prefix: str = "", size_hint: Optional[Size] = None,
                    pinned: bool = False, max_models: Optional[int] = None, check_id: IdCheck = None,
                    **options: Any) -> Callable[[Callable[[str], object]], MultiplexedFunction[Any]]: ...

    def multiplexed(self, *, backend: Union[str, Type[Backend]] = "auto", prefix: str = "",
                    size_hint: Optional[Size] = None, pinned: bool = False, max_models: Optional[int] = None,
                    check_id: IdCheck = None, **options: Any
                    ) -> Callable[[Callable[[str], Any]], MultiplexedFunction[Any]]:
        """One loader for many model ids (as Ray Serve's multiplexing): ``load(model_id)`` registers
        ``prefix + model_id`` on first call and returns a lease on it (``with`` or ``async with``)::

            @cache.multiplexed(backend="onnxruntime", max_models=8)
            async def load(model_id): return f"models/{model_id}.onnx"
            async with load("en-v2") as session: ...

        ``max_models``: beyond this many ids, the least recently used unleased one is unregistered.
        ``check_id``: a regular expression an id must match whole, or a callable returning whether
        it is accepted; the default refuses path separators, ``..`` and NUL (ids often become paths).
        Arguments are checked when decorating."""
        return multiplexed(cast("ModelCache", self), backend, prefix, size_hint, pinned, max_models, check_id,
                           options)


def model(cache: "ModelCache", name: str, backend: Union[str, Type[Backend]], size_hint: Optional[Size],
          pinned: bool, options: Dict[str, Any]) -> Callable[[Callable[[], Any]], ModelFunction[Any]]:
    """See :meth:`ModelCache.model`."""
    def decorate(fn: Callable[[], Any]) -> ModelFunction[Any]:
        cache._register(name, fn, backend, size_hint, pinned, options, owner=fn)

        @functools.wraps(fn)
        def lease(timeout: Optional[float] = DEFAULT_TIMEOUT) -> Lease[Any]:
            return cache.use(name, timeout)

        made = cast("ModelFunction[Any]", lease)     # once it has the attributes set here
        made.model_name = name
        made.cache = cache
        return made
    return decorate


def multiplexed(cache: "ModelCache", backend: Union[str, Type[Backend]], prefix: str, size_hint: Optional[Size],
                pinned: bool, max_models: Optional[int], check_id: IdCheck,
                options: Dict[str, Any]) -> Callable[[Callable[[str], Any]], MultiplexedFunction[Any]]:
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

    def decorate(fn: Callable[[str], Any]) -> MultiplexedFunction[Any]:
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
        def lease(model_id: str, timeout: Optional[float] = DEFAULT_TIMEOUT) -> Lease[Any]:
            if not isinstance(model_id, str) or not model_id:
                raise ConfigError(f"model_id={model_id!r} must be a non-empty string")
            if not accept(model_id):
                raise ConfigError(f"model_id={model_id!r} refused by the id check ({_describe(check_id)})",
                                  model=prefix + model_id)
            return _MultiplexedLease(cache, ensure(model_id), timeout, lambda: ensure(model_id))

        made = cast("MultiplexedFunction[Any]", lease)     # once it has the attributes set here
        made.cache = cache
        made.model_ids = lambda: list(used)
        return made
    return decorate


class _MultiplexedLease(Lease[M]):
    """A lease on a multiplexed id: if the id was unregistered (beyond ``max_models``) between the
    call and the acquisition, it is registered again."""

    __slots__ = ("_ensure",)

    def __init__(self, cache: "ModelCache", name: str, timeout: Optional[float], ensure: Callable[[], str]) -> None:
        super().__init__(cache, name, timeout)
        self._ensure = ensure

    def acquire(self) -> M:
        try:
            return super().acquire()
        except ModelNotFoundError:
            self._ensure()
            return super().acquire()

    __enter__ = acquire      # Lease binds its own acquire to ``with``

    async def aacquire(self) -> M:
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
        return lambda model_id: bool(check(model_id))
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
