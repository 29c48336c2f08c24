"""Backends, one module each; heavy imports stay inside those modules' methods.

``backend="auto"`` asks each known backend, in :data:`AUTO_ORDER`, whether it accepts what the
loader returned. A new backend is a :class:`Backend` subclass in its own module, listed in
:data:`BUILTIN` (or passed to :func:`register_backend` / ``register(backend=MyBackend)``).
"""
from __future__ import annotations

import importlib
import threading
from typing import Any, Dict, List, Type, Union

from ..errors import ConfigError, UnsupportedModelError
from .base import Backend, BackendContext, Handle

#: name -> "module:Class", imported on first use
BUILTIN: Dict[str, str] = {
    "python": "modelcache.backends.python:PythonBackend",
    "onnxruntime": "modelcache.backends.onnxruntime.backend:OnnxRuntimeBackend",
    "tensorrt": "modelcache.backends.tensorrt.backend:TensorRTBackend",
}
#: detection order for backend="auto": most specific first, "python" last
AUTO_ORDER: List[str] = ["tensorrt", "onnxruntime", "python"]

_registry: Dict[str, Type[Backend]] = {}
_lock = threading.Lock()


def register_backend(cls: Type[Backend], *, auto: bool = False) -> Type[Backend]:
    """Make ``cls`` known under ``cls.name``; with ``auto=True`` it is tried before the built-ins
    during ``backend="auto"`` detection."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"register_backend({cls!r}): expected a Backend subclass")
    with _lock:
        _registry[cls.name] = cls
        if auto and cls.name not in AUTO_ORDER:
            AUTO_ORDER.insert(0, cls.name)
    return cls


def backend_class(backend: Union[str, Type[Backend]]) -> Type[Backend]:
    """A backend class from its name or the class itself."""
    if isinstance(backend, type) and issubclass(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise ConfigError(f"backend={backend!r} is not a backend name or Backend subclass")
    with _lock:
        cls = _registry.get(backend)
    if cls is not None:
        return cls
    target = BUILTIN.get(backend)
    if target is None:
        known = sorted(set(BUILTIN) | set(_registry) | {"auto"})
        raise ConfigError(f"backend={backend!r} is unknown; use one of {known} or a Backend subclass")
    module, _, attr = target.partition(":")
    loaded: Type[Backend] = getattr(importlib.import_module(module), attr)
    with _lock:
        _registry.setdefault(backend, loaded)
    return loaded


def detect_backend(name: str, value: Any, options: Dict[str, Any]) -> Type[Backend]:
    """The first backend in :data:`AUTO_ORDER` that accepts ``value``."""
    for candidate in list(AUTO_ORDER):
        cls = backend_class(candidate)
        if cls.accepts(value, options):
            return cls
    raise UnsupportedModelError(
        f"no backend accepts a {type(value).__module__}.{type(value).__name__} returned by the loader; "
        f"tried {AUTO_ORDER} (pass backend= explicitly, or size_hint= for the python backend)", model=name)


__all__ = ["Backend", "BackendContext", "Handle", "BUILTIN", "AUTO_ORDER", "register_backend",
           "backend_class", "detect_backend"]
