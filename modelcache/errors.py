"""Every error modelcache raises derives from :class:`ModelCacheError`, and from nothing else:
``except ModelCacheError`` catches all of them and ``except ValueError`` (or ``KeyError``,
``TypeError``...) none. All are exported from ``modelcache``.

Messages name the model (when there is one) and the cause; the model's name is also
kept on the ``model`` attribute.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Type


class ModelCacheError(Exception):
    """Root of all modelcache errors."""

    def __init__(self, message: str, *, model: Optional[str] = None) -> None:
        self.model = model
        self.reason = message
        super().__init__(message)

    def __str__(self) -> str:       # the model may be named after the error was made (the cache adds it)
        return f"model {self.model!r}: {self.reason}" if self.model is not None else self.reason

    def __reduce__(self) -> Tuple[Callable[..., ModelCacheError], Tuple[Any, ...]]:
        # keep pickling (e.g. across processes) working with keyword args
        return (_rebuild, (type(self), self.reason, self.model))


def _rebuild(cls: Type[ModelCacheError], reason: str, model: Optional[str]) -> ModelCacheError:
    err = cls.__new__(cls)
    ModelCacheError.__init__(err, reason, model=model)
    return err


class ConfigError(ModelCacheError):
    """A bad argument: the message states the bad value and what is allowed."""


class ModelNotFoundError(ModelCacheError):
    """No model is registered under that name."""


class DuplicateModelError(ModelCacheError):
    """A model is already registered under that name."""


class ModelInUseError(ModelCacheError):
    """The operation needs the model unleased, but leases are held."""


class LoaderError(ModelCacheError):
    """The user's loader raised; the original exception is ``__cause__``.

    The entry stays registered; the next request calls the loader again.
    """


class UnsupportedModelError(ModelCacheError):
    """No backend accepts what the loader returned, or the chosen backend rejects it."""


class BackendError(ModelCacheError):
    """A backend failed to move a model between tiers; ``__cause__`` holds the backend's error."""


class InvalidModelError(UnsupportedModelError):
    """The model is malformed, incomplete (e.g. missing external data) or refused by its runtime."""


class ModelRunError(BackendError):
    """The runtime failed to run the model (the message carries the runtime's own)."""


class CorruptFileError(ModelCacheError):
    """A file on the disk tier is missing, truncated or fails its sha256 check."""


class LeaseTimeoutError(ModelCacheError):
    """``use()`` gave up after its timeout."""


class DeviceBusyError(LeaseTimeoutError):
    """No room could be made on the device within the timeout: everything resident is leased
    (or memory is held by other processes)."""


class ModelTooLargeError(ModelCacheError):
    """The model needs more device memory than the whole budget allows; raised at once."""


class DeviceOutOfMemoryError(ModelCacheError):
    """An allocation on the device failed (on a :class:`SimulatedDevice`, or a CUDA OOM)."""


class ModelInputError(ModelCacheError):
    """A run was given inputs the model does not have, or lacks inputs it needs; the message lists
    the model's real inputs."""


class EngineDeserializationError(BackendError):
    """TensorRT refused a plan (corrupt, truncated, foreign, or built for another GPU); the
    message carries TensorRT's own log lines (also on ``trt_messages``)."""

    def __init__(self, message: str, *, model: Optional[str] = None,
                 trt_messages: Optional[Sequence[str]] = None) -> None:
        super().__init__(message, model=model)
        self.trt_messages = list(trt_messages or [])


class EngineCompatibilityError(ModelCacheError):
    """A plan's sidecar says it was built for another TensorRT, CUDA or GPU than the one running."""


class EngineBuildError(ModelCacheError):
    """Building a TensorRT plan from ONNX failed; the message carries the parser's or builder's log."""


class MonitorError(ModelCacheError):
    """A memory monitor could not be set up or read (e.g. NVML missing on a CPU-only machine)."""


class CacheClosedError(ModelCacheError):
    """The cache was closed."""


__all__ = [
    "ModelCacheError",
    "ConfigError",
    "ModelNotFoundError",
    "DuplicateModelError",
    "ModelInUseError",
    "LoaderError",
    "UnsupportedModelError",
    "BackendError",
    "CorruptFileError",
    "LeaseTimeoutError",
    "DeviceBusyError",
    "ModelTooLargeError",
    "DeviceOutOfMemoryError",
    "MonitorError",
    "CacheClosedError",
    "ModelInputError",
    "InvalidModelError",
    "ModelRunError",
    "EngineDeserializationError",
    "EngineCompatibilityError",
    "EngineBuildError",
]
