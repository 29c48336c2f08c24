"""Errors of ``modelcache.ray``: subclasses of modelcache's own (``modelcache/errors.py``), so
``except modelcache.ModelCacheError`` catches them too. Each names the model and the cause."""
from __future__ import annotations

from ..errors import ConfigError, ModelCacheError


class MissingModelIdError(ConfigError):
    """A request reached a replica without a multiplexed model id: send it with
    ``handle.options(multiplexed_model_id=...)`` or the ``serve_multiplexed_model_id`` HTTP header."""


class ReplicaSetupError(ModelCacheError):
    """A replica could not set up its caches (no device, a bad option): the message says why."""


__all__ = ["MissingModelIdError", "ReplicaSetupError"]
