"""A double of TensorRT's Python runtime API, for testing the device tier without a GPU that runs
TensorRT plans. Pass the module itself as ``trt_module=trt_double``.

What it keeps faithful (TensorRT 10 semantics):
- ``Runtime(logger).deserialize_cuda_engine(plan)`` returns None and logs an ERROR for garbage
  (a magic-tag message), truncated plans and plans of another version, as TensorRT does;
- ``ICudaEngine``: I/O tensors by name (``num_io_tensors``, ``get_tensor_name/mode/shape/dtype``),
  ``device_memory_size_v2``, ``serialize()`` -> ``IHostMemory``, and
  ``create_execution_context(ExecutionContextAllocationStrategy)``;
- ``IExecutionContext``: ``set_input_shape``, ``get_tensor_shape``, ``set_tensor_address``,
  ``set_device_memory(ptr, size)`` (required before running under USER_MANAGED, with at least
  ``device_memory_size_v2`` bytes), ``execute_async_v3(stream)`` returning False on misuse;
- a minimal ``Builder``/``OnnxParser`` that turn an ONNX file into a plan of this double.

The "engine" computes ``y = x * scale`` for each output on host memory addresses (a simulated
device's buffers are host memory). ``STATS`` counts calls for the tests.
"""
from __future__ import annotations

import ctypes
import enum
import json
import struct
import threading
import time

import numpy as np

__version__ = "10.99.0"
MAGIC = b"ftrt"
STATS = {"deserialize": 0, "serialize": 0, "build": 0, "execute": 0, "live_engines": 0, "max_concurrent": 0}
_running = 0
_lock = threading.Lock()


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass

    def log(self, severity, msg):  # pragma: no cover - overridden
        pass


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 5


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.INT64: np.int64}


def nptype(dtype):
    return _NP[DataType(dtype)]


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    FP16 = 0


class IHostMemory(bytes):
    """Serialized plan bytes (supports the buffer protocol, like TensorRT's)."""

    @property
    def nbytes(self) -> int:
        return len(self)

    @property
    def dtype(self):
        return DataType.INT8


def make_plan(inputs=None, outputs=None, scale=2.0, scratch_bytes=1 << 20, weights_bytes=4096, sleep_s=0.0,
              version=None) -> IHostMemory:
    """A plan of this double: inputs/outputs map names to shapes (-1 = dynamic)."""
    header = {"version": version or __version__, "inputs": inputs or {"x": [-1, 8]},
              "outputs": outputs or {"y": [-1, 8]}, "scale": scale, "scratch": scratch_bytes,
              "weights": weights_bytes, "sleep": sleep_s}
    raw = json.dumps(header).encode()
    return IHostMemory(MAGIC + struct.pack("<I", len(raw)) + raw + bytes(weights_bytes))


class Runtime:
    def __init__(self, logger) -> None:
        self.logger = logger

    def _error(self, text):
        self.logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: " + text)

    def deserialize_cuda_engine(self, plan):
        data = bytes(memoryview(plan))
        STATS["deserialize"] += 1
        self.logger.log(ILogger.Severity.INFO, f"Loaded engine size: {len(data) >> 20} MiB")
        if len(data) < 8 or data[:4] != MAGIC:
            self._error("Serialization (Serialization assertion header.magicTag == kEXPECTED_MAGIC_TAG failed.)")
            return None
        (hlen,) = struct.unpack("<I", data[4:8])
        try:
            header = json.loads(data[8:8 + hlen])
        except ValueError:
            self._error("Serialization (Serialization assertion stdVersionRead == kSERIALIZATION_VERSION failed.)")
            return None
        if header["version"] != __version__:
            self._error(f"Serialization (Serialization assertion: the engine plan file is not compatible with this "
                        f"version of TensorRT, expecting library version {__version__} got {header['version']})")
            return None
        if len(data) != 8 + hlen + header["weights"]:
            self._error(f"Serialization (Serialization assertion size == expected failed: plan is "
                        f"{len(data)} bytes, expected {8 + hlen + header['weights']} (truncated?))")
            return None
        return ICudaEngine(header, data)


class ICudaEngine:
    def __init__(self, header, data) -> None:
        self._h, self._data = header, data
        self._names = list(header["inputs"]) + list(header["outputs"])
        with _lock:
            STATS["live_engines"] += 1

    def __del__(self):
        with _lock:
            STATS["live_engines"] -= 1

    @property
    def num_io_tensors(self):
        return len(self._names)

    def get_tensor_name(self, i):
        return self._names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self._h["inputs"] else TensorIOMode.OUTPUT

    def get_tensor_shape(self, name):
        return tuple((self._h["inputs"].get(name) or self._h["outputs"][name]))

    def get_tensor_dtype(self, name):
        return DataType.FLOAT

    @property
    def device_memory_size_v2(self):
        return self._h["scratch"]

    @property
    def num_optimization_profiles(self):
        return 1

    def serialize(self):
        STATS["serialize"] += 1
        return IHostMemory(self._data)

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        return IExecutionContext(self, ExecutionContextAllocationStrategy(strategy))


class IExecutionContext:
    def __init__(self, engine, strategy) -> None:
        self.engine, self.strategy = engine, strategy
        self._shapes, self._addresses = {}, {}
        self._memory = None

    def set_input_shape(self, name, shape):
        expected = self.engine._h["inputs"].get(name)
        if expected is None or len(expected) != len(shape) or any(e >= 0 and e != s for e, s in zip(expected, shape)):
            return False
        self._shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self._shapes:
            return self._shapes[name]
        first = next(iter(self.engine._h["inputs"]))
        return self._shapes.get(first, tuple(self.engine.get_tensor_shape(name)))

    def set_tensor_address(self, name, ptr):
        self._addresses[name] = int(ptr)
        return True

    def set_device_memory(self, memory, size):
        if size < self.engine.device_memory_size_v2:
            raise ValueError(f"size {size} < device_memory_size_v2 {self.engine.device_memory_size_v2}")
        self._memory = (int(memory), int(size))

    def execute_async_v3(self, stream_handle):
        global _running
        h = self.engine._h
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self._memory is None:
            return False
        names = list(h["inputs"]) + list(h["outputs"])
        if any(n not in self._addresses for n in names) or any(n not in self._shapes for n in h["inputs"]):
            return False
        with _lock:
            _running += 1
            STATS["max_concurrent"] = max(STATS["max_concurrent"], _running)
            STATS["execute"] += 1
        try:
            if h["sleep"]:
                time.sleep(h["sleep"])
            first = next(iter(h["inputs"]))
            shape = self._shapes[first]
            count = int(np.prod(shape))
            x = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self._addresses[first])).copy()
            for out in h["outputs"]:
                y = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self._addresses[out]))
                y[:] = x * np.float32(h["scale"])
        finally:
            with _lock:
                _running -= 1
        return True


# ---------------------------------------------------------------- a minimal builder
class _Tensor:
    def __init__(self, name, shape) -> None:
        self.name, self.shape = name, tuple(shape)


class INetworkDefinition:
    def __init__(self) -> None:
        self.inputs, self.outputs, self.weights = [], [], 0

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class OnnxParser:
    def __init__(self, network, logger) -> None:
        self.network, self.logger, self.errors = network, logger, []

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]

    def parse_from_file(self, path):
        import onnx
        try:
            model = onnx.load(path)
        except Exception as exc:
            self.errors.append(f"ModelImporter: failed to parse ONNX model: {exc}")
            return False
        dims = lambda vi: [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]  # noqa
        inits = {i.name for i in model.graph.initializer}
        self.network.inputs = [_Tensor(i.name, dims(i)) for i in model.graph.input if i.name not in inits]
        self.network.outputs = [_Tensor(o.name, dims(o)) for o in model.graph.output]
        self.network.weights = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (lo, opt, hi)


class IBuilderConfig:
    def __init__(self) -> None:
        self.profiles, self.flags, self.pools = [], set(), {}

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)


class Builder:
    def __init__(self, logger) -> None:
        self.logger = logger

    def create_network(self, flags=0):
        return INetworkDefinition()

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        STATS["build"] += 1
        return make_plan({t.name: list(t.shape) for t in network.inputs},
                         {t.name: list(t.shape) for t in network.outputs}, weights_bytes=network.weights)


# ---------------------------------------------------------------- on a real GPU
#: When True, tensor and scratch addresses are CUDA device pointers: execute_async_v3 waits for the
#: stream, then reads and writes them with cudaMemcpy (cuda-python). The GPU tests use this to run
#: modelcache's real device buffers, copies and streams around the double.
DEVICE_MEMORY = False


def _device_rw(ptr, count, data=None):
    from cuda.bindings import runtime as rt
    if data is None:
        out = np.empty(count, np.float32)
        err, = rt.cudaMemcpy(out.ctypes.data, ptr, out.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        assert err == rt.cudaError_t.cudaSuccess, err
        return out
    err, = rt.cudaMemcpy(ptr, data.ctypes.data, data.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
    assert err == rt.cudaError_t.cudaSuccess, err


_host_execute = IExecutionContext.execute_async_v3


def _execute(self, stream_handle):
    if not DEVICE_MEMORY:
        return _host_execute(self, stream_handle)
    from cuda.bindings import runtime as rt
    h = self.engine._h
    if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self._memory is None:
        return False
    rt.cudaStreamSynchronize(stream_handle)
    first = next(iter(h["inputs"]))
    count = int(np.prod(self._shapes[first]))
    x = _device_rw(self._addresses[first], count)
    for out in h["outputs"]:
        _device_rw(self._addresses[out], count, (x * np.float32(h["scale"])).astype(np.float32))
    STATS["execute"] += 1
    return True


IExecutionContext.execute_async_v3 = _execute
