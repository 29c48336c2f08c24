"""modelcache: hold more inference models than fit on the GPU.

Hot models stay on the device; the rest are parked in host RAM or on disk and moved back in on
demand, with device memory readings (NVML, or a simulated device) deciding what to evict::

    import modelcache as mc
    cache = mc.ModelCache(device_budget="6GiB", reserve="512MiB")
    cache.register("bert", "models/bert.onnx")
    with cache.use("bert") as session:
        ...

Importing this package needs none of the heavy optional packages (onnxruntime, tensorrt,
cuda-python, nvidia-ml-py): backends and devices import them when first used. The command-line
tools live in ``modelcache.tools``, Prometheus metrics in ``modelcache.metrics`` (neither imported
here).
"""
from .backends import Backend, BackendContext, Handle, register_backend
from .cache import ModelCache
from .events import EVENTS, Event
from .lease import Lease
from .errors import (BackendError, CacheClosedError, ConfigError, CorruptFileError, DeviceBusyError,
                     DeviceOutOfMemoryError, DuplicateModelError, EngineBuildError, EngineCompatibilityError,
                     EngineDeserializationError, InvalidModelError, LeaseTimeoutError, LoaderError, ModelCacheError,
                     ModelInputError, ModelInUseError, ModelNotFoundError, ModelRunError, ModelTooLargeError,
                     MonitorError, UnsupportedModelError)
from .devices import DeviceMonitor, HostMonitor, MemoryReading, NvmlMonitor, SimulatedDevice
from .policies import Candidate, CostPolicy, LFUPolicy, LRUPolicy, Policy
from .sizes import format_bytes, parse_size
from .tiers import EntryInfo, Tier

__version__ = "0.1.0"

__all__ = [
    "ModelCache", "Lease", "Tier", "EntryInfo", "Event", "EVENTS",
    "Backend", "BackendContext", "Handle", "register_backend",
    "DeviceMonitor", "MemoryReading", "NvmlMonitor", "HostMonitor", "SimulatedDevice",
    "Policy", "Candidate", "LRUPolicy", "LFUPolicy", "CostPolicy",
    "parse_size", "format_bytes",
    "ModelCacheError", "ConfigError", "ModelNotFoundError", "DuplicateModelError", "ModelInUseError",
    "LoaderError", "UnsupportedModelError", "BackendError", "CorruptFileError", "LeaseTimeoutError",
    "DeviceBusyError", "ModelTooLargeError", "DeviceOutOfMemoryError", "MonitorError", "CacheClosedError",
    "EngineDeserializationError", "EngineCompatibilityError", "EngineBuildError", "ModelInputError",
    "InvalidModelError", "ModelRunError",
    "__version__",
]
