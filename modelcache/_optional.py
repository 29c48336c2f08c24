"""Importing optional packages with an install hint when they are missing."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ModelCacheError


def require(module: str, purpose: str, install: str) -> ModuleType:
    """``import module``, or a :class:`ModelCacheError` saying what needs it and how to install it
    (``install``: what to type, e.g. ``"pip install 'modelcache[onnxruntime]'"``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelCacheError(f"{purpose} needs the {module} package, which is not installed ({exc}): "
                              f"{install}") from exc
