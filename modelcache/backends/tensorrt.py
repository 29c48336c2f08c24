"""The "tensorrt" backend: engines on the device, serialized plans in host memory or on disk.

Loader results: a ``.plan``/``.engine`` path (with its ``.json`` sidecar when there is one), plan
bytes or an ``IHostMemory``, a live ``ICudaEngine``, or an ``.onnx`` path (built into a plan
through the build cache, see ``tensorrt_build``).

Tiers: device = the deserialized engine (execution contexts made on demand, with scratch memory
from one pool shared by all engines); host = the plan bytes (kept while on the device, so eviction
never serializes again when they are known); disk = a ``.plan`` file plus a JSON sidecar
(TensorRT module and version, CUDA version, GPU name and compute capability, sha256 of the plan
and of the source ONNX, build options). Before deserializing, the sidecar is checked against the
running environment: a mismatch raises :class:`EngineCompatibilityError`, or rebuilds from the
source ONNX when it is known. A plan TensorRT refuses raises :class:`EngineDeserializationError`
with TensorRT's own messages.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .._fileio import atomic_write, model_file, read_verified, remove_quietly
from ..cuda import DeviceBuffer, StreamPool, align, as_int, device_pointer
from ..errors import (BackendError, ConfigError, CorruptFileError, EngineCompatibilityError,
                      EngineDeserializationError, ModelCacheError, ModelInputError, UnsupportedModelError)
from ..tiers import Tier
from .base import Backend, BackendContext, Handle
from .tensorrt_build import (BuildCache, BuildOptions, environment, import_trt, iter_io, logger_for, mismatches,
                             read_sidecar, write_sidecar)

_OPTIONS = {"trt_module", "build", "build_cache_dir", "rebuild", "size_hint"}
_PLAN_SUFFIXES = (".plan", ".engine", ".trt")


class TrtHandle(Handle):
    def __init__(self, name: str, trt: Any) -> None:
        super().__init__(name, Tier.HOST)
        self.trt = trt
        self.plan: Any = None                   # bytes-like or IHostMemory; None when only the engine exists
        self.plan_nbytes = 0
        self.sidecar: Optional[Dict[str, Any]] = None
        self.source_onnx: Optional[str] = None
        self.build_options: Optional[BuildOptions] = None
        self.engine: Any = None
        self.allocation: Any = None             # SimulatedAllocation of the weights on a simulated device
        self.scratch_bytes = 0
        self.contexts: List["_Context"] = []    # idle execution contexts
        self.contexts_lock = threading.Lock()
        self.wrapper: Optional["TrtModel"] = None
        self.files: Dict[str, Tuple[str, str]] = {}
        self.serializations = 0
        self.rebuilds = 0

    def estimated_device_bytes(self) -> int:
        return self.device_bytes or self.plan_nbytes

    def estimated_host_bytes(self) -> int:
        return self.plan_nbytes

    def details(self) -> Dict[str, Any]:
        return {"trt_module": getattr(self.trt, "__name__", None), "plan_bytes": self.plan_nbytes,
                "weights_bytes": self.device_bytes, "scratch_bytes": self.scratch_bytes,
                "plan_known": self.plan is not None, "serializations": self.serializations,
                "rebuilds": self.rebuilds, "source_onnx": self.source_onnx,
                "built_for": {k: (self.sidecar or {}).get(k) for k in ("trt_version", "gpu_name", "compute_capability")}}


class _Context:
    """An execution context with its I/O buffers (reused across runs while large enough)."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.buffers: Dict[str, Tuple[Any, int, int]] = {}   # name -> (keepalive, ptr, nbytes)

    def buffer(self, backend: "TensorRTBackend", name: str, nbytes: int) -> int:
        held = self.buffers.get(name)
        if held is None or held[2] < nbytes:
            if held is not None:
                backend._free_io(held[0])
            keep, ptr = backend._alloc_io(max(nbytes, 1))
            held = self.buffers[name] = (keep, ptr, max(nbytes, 1))
        return held[1]

    def close(self, backend: "TensorRTBackend") -> None:
        for keep, _, _ in self.buffers.values():
            backend._free_io(keep)
        self.buffers.clear()
        self.context = None


class ScratchPool:
    """Activation ("scratch") memory shared by every engine: slots of the largest
    ``device_memory_size_v2`` among resident engines, one per run in flight, so N cached engines do
    not hold N scratch buffers."""

    def __init__(self, backend: "TensorRTBackend") -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._idle: List[Tuple[Any, int, int]] = []   # (keepalive, ptr, nbytes)
        self.busy = 0
        self.slot_bytes = 0        # size new slots get: the largest scratch among resident engines
        self.total_bytes = 0
        self.peak_slots = 0

    def resize(self, slot_bytes: int) -> None:
        """Engines came or went: new slots get ``slot_bytes``; idle slots of another size are freed."""
        with self._lock:
            self.slot_bytes = slot_bytes
            keep = [s for s in self._idle if s[2] == slot_bytes]
            drop = [s for s in self._idle if s[2] != slot_bytes]
            self._idle = keep
        for slot in drop:
            self._free(slot)

    @contextlib.contextmanager
    def slot(self, need: int) -> Iterator[Tuple[int, int]]:
        """A slot of at least ``need`` bytes for one run: ``(address, nbytes)``."""
        with self._lock:
            size = max(need, self.slot_bytes)
            fits = [s for s in self._idle if s[2] >= need]
            slot = min(fits, key=lambda s: s[2]) if fits else None
            if slot is not None:
                self._idle.remove(slot)
            self.busy += 1
            self.peak_slots = max(self.peak_slots, self.busy + len(self._idle))
        try:
            if slot is None:
                keep, ptr = self._backend._alloc_scratch(size)
                slot = (keep, ptr, size)
                with self._lock:
                    self.total_bytes += size
            yield slot[1], slot[2]
        finally:
            with self._lock:
                self.busy -= 1
                stale = slot is not None and slot[2] != self.slot_bytes   # engines changed meanwhile
                if slot is not None and not stale:
                    self._idle.append(slot)
            if stale:
                self._free(slot)

    def _free(self, slot: Tuple[Any, int, int]) -> None:
        self._backend._free_io(slot[0])
        with self._lock:
            self.total_bytes -= slot[2]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for slot in idle:
            self._free(slot)


class TrtModel:
    """What ``use()`` hands out for a TensorRT engine.

    ``run({name: array})`` returns ``{output name: array}`` (numpy in and out, names as the engine
    has them); ``run_device(inputs, outputs, stream=)`` takes device addresses (ints, pycuda
    allocations, or ``__cuda_array_interface__`` objects) for callers that keep data on the GPU.
    """

    def __init__(self, backend: "TensorRTBackend", handle: TrtHandle) -> None:
        self._backend, self._handle = backend, handle
        self.name = handle.name
        trt = handle.trt
        self.input_names: List[str] = []
        self.output_names: List[str] = []
        for tensor, is_input in iter_io(handle.engine, trt):
            (self.input_names if is_input else self.output_names).append(tensor)
        self._dtypes = {n: np.dtype(trt.nptype(handle.engine.get_tensor_dtype(n)))
                        for n in self.input_names + self.output_names}
        self.valid = True

    @property
    def engine(self) -> Any:
        self._alive()
        return self._handle.engine

    def run(self, feeds: Dict[str, Any], output_names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
        self._alive()
        unknown = [k for k in feeds if k not in self.input_names]
        missing = [k for k in self.input_names if k not in feeds]
        if unknown or missing:
            raise ModelInputError(f"bad inputs: unknown {unknown}, missing {missing}; the engine's inputs are "
                                  f"{self.input_names}", model=self.name)
        wanted = output_names or self.output_names
        bad = [o for o in wanted if o not in self.output_names]
        if bad:
            raise ModelInputError(f"unknown output(s) {bad}; the engine's outputs are {self.output_names}",
                                  model=self.name)
        backend, handle = self._backend, self._handle
        with backend.scratch.slot(handle.scratch_bytes) as scratch, backend._context(handle) as ctx:
            context = ctx.context
            backend._bind_scratch(context, scratch)
            host_in = {}
            for name, value in feeds.items():
                array = np.ascontiguousarray(value, dtype=self._dtypes[name])
                host_in[name] = array
                context.set_input_shape(name, tuple(array.shape))
                ptr = ctx.buffer(backend, name, array.nbytes)
                backend._copy_in(ptr, array)
                context.set_tensor_address(name, ptr)
            outputs = {}
            for name in self.output_names:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BackendError(f"output {name!r} has unresolved shape {shape}", model=self.name)
                array = np.empty(shape, dtype=self._dtypes[name])
                ptr = ctx.buffer(backend, name, array.nbytes)
                context.set_tensor_address(name, ptr)
                outputs[name] = (array, ptr)
            backend._execute(handle, context)
            for array, ptr in outputs.values():
                backend._copy_out(array, ptr)
            backend._sync()
        return {name: outputs[name][0] for name in wanted}

    def run_device(self, inputs: Dict[str, Any], outputs: Dict[str, Any], shapes: Optional[Dict[str, Any]] = None,
                   stream: int = 0) -> None:
        """Run on device memory you own. ``inputs``/``outputs``: name -> address or array with
        ``__cuda_array_interface__``; ``shapes`` gives input shapes for raw addresses."""
        self._alive()
        backend, handle = self._backend, self._handle
        with backend.scratch.slot(handle.scratch_bytes) as scratch, backend._context(handle) as ctx:
            context = ctx.context
            backend._bind_scratch(context, scratch)
            for name, value in inputs.items():
                iface = getattr(value, "__cuda_array_interface__", None)
                shape = (shapes or {}).get(name) or (iface or {}).get("shape")
                if shape is None:
                    raise ModelInputError(f"input {name!r}: give its shape in shapes=", model=self.name)
                context.set_input_shape(name, tuple(shape))
                context.set_tensor_address(name, device_pointer(value))
            for name, value in outputs.items():
                context.set_tensor_address(name, device_pointer(value))
            backend._execute(handle, context, stream)

    def _alive(self) -> None:
        if not self.valid:
            raise ModelCacheError("this engine object was used after its lease ended and the model moved; use it "
                                  "only inside `with cache.use(...)`", model=self.name)


class TensorRTBackend(Backend):
    """TensorRT engines; see the module docstring."""

    name = "tensorrt"

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.on_gpu = not context.monitor.simulated
        self.scratch = ScratchPool(self)
        self.streams = StreamPool()
        self._runtimes: Dict[int, Any] = {}
        self._envs: Dict[int, Dict[str, Any]] = {}
        self._builds: Dict[Tuple[str, int], BuildCache] = {}
        self._lock = threading.Lock()
        self._resident: Dict[int, int] = {}    # id(handle) -> scratch bytes, engines on the device
        self._fake_addresses = itertools.count(1 << 40, 1 << 30)
        self.counters = {"deserializations": 0, "deserialization_errors": 0, "serializations": 0, "rebuilds": 0}

    @classmethod
    def accepts(cls, value: Any, options: Dict[str, Any]) -> bool:
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value).lower()
            return path.endswith(_PLAN_SUFFIXES) or (path.endswith(".onnx") and "build" in options)
        kind = type(value).__name__
        return kind in ("IHostMemory", "ICudaEngine") or "trt_module" in options

    # load -----------------------------------------------------------------------------------------
    def _load_impl(self, name: str, value: Any, options: Dict[str, Any]) -> TrtHandle:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigError(f"unknown tensorrt option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}", model=name)
        trt = import_trt(options.get("trt_module"))
        handle = TrtHandle(name, trt)
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            if path.lower().endswith(".onnx"):
                handle.source_onnx = os.path.abspath(path)
                handle.build_options = BuildOptions.of(options.get("build"))
                self._take_built(handle, self._build_cache(trt, options))
            elif os.path.exists(path):
                self._read_plan(handle, path, read_sidecar(path + ".json"))
            else:
                raise UnsupportedModelError(f"no plan file at {path}", model=name)
        elif isinstance(value, (bytes, bytearray, memoryview)) or type(value).__name__ == "IHostMemory":
            handle.plan = value
            handle.plan_nbytes = _nbytes(value)
        elif hasattr(value, "create_execution_context") and hasattr(value, "num_io_tensors"):
            handle.engine = value                 # already on the device; the plan is unknown
            handle.tier = Tier.DEVICE
            self._engine_ready(handle, measured=None)
        else:
            raise UnsupportedModelError(f"the tensorrt backend takes a .plan/.onnx path, plan bytes, IHostMemory "
                                        f"or an ICudaEngine, not {type(value).__name__}", model=name)
        handle.host_bytes = handle.plan_nbytes if handle.plan is not None else 0
        return handle

    @staticmethod
    def _take_built(handle: TrtHandle, cache: BuildCache) -> None:
        """The plan of ``handle.source_onnx`` from the build cache (built if needed; a cached plan
        is read and checked once, by the cache)."""
        assert handle.source_onnx is not None
        _, sidecar, plan, _ = cache.fetch(handle.source_onnx, handle.build_options)
        handle.plan, handle.plan_nbytes, handle.sidecar = plan, _nbytes(plan), sidecar

    def _read_plan(self, handle: TrtHandle, path: str, sidecar: Optional[Dict[str, Any]]) -> None:
        data = read_verified(path, (sidecar or {}).get("plan_sha256"), model=handle.name)
        handle.plan, handle.plan_nbytes, handle.sidecar = data, len(data), sidecar
        if sidecar and not handle.source_onnx and sidecar.get("onnx_path") and os.path.exists(sidecar["onnx_path"]):
            handle.source_onnx = sidecar["onnx_path"]      # known source: an incompatible plan is rebuilt
            handle.build_options = BuildOptions.of(sidecar.get("build_options") or {})

    def _build_cache(self, trt: Any, options: Dict[str, Any]) -> BuildCache:
        folder = options.get("build_cache_dir") or os.path.join(
            self.context.disk_dir or os.path.expanduser("~/.cache/modelcache"), "tensorrt-plans")
        key = (os.path.abspath(folder), id(trt))
        with self._lock:
            cache = self._builds.get(key)
            if cache is None:
                cache = self._builds[key] = BuildCache(folder, trt, self.context.device, not self.on_gpu)
            return cache

    # moves ------------------------------------------------------------------------------------------
    def _to_device_impl(self, handle: TrtHandle) -> None:
        self._check_compatible(handle)
        trt = handle.trt
        runtime = self._runtime(trt)
        logger = logger_for(trt)
        allocation = None
        if not self.on_gpu:
            allocation = self.context.monitor.allocate(handle.plan_nbytes, owner=handle.name)  # type: ignore[attr-defined]
        try:
            with logger.capture() as log:
                before = self.context.monitor.process_bytes() if self.on_gpu else None
                engine = runtime.deserialize_cuda_engine(handle.plan)
                after = self.context.monitor.process_bytes() if self.on_gpu else None
            if engine is None:
                with self._lock:
                    self.counters["deserialization_errors"] += 1
                messages = log.errors(trt)
                raise EngineDeserializationError(
                    "TensorRT could not deserialize the plan: " + " | ".join(messages[-4:] or ["(no message)"]),
                    model=handle.name, trt_messages=messages)
        except BaseException:
            if allocation is not None:
                allocation.free()
            raise
        with self._lock:
            self.counters["deserializations"] += 1
        if handle.sidecar is None:      # it runs here: record where, for the disk tier's sidecar
            handle.sidecar = dict(self._env(trt))
        handle.engine, handle.allocation = engine, allocation
        measured = (after - before) if (before is not None and after is not None) else None
        self._engine_ready(handle, measured)

    def _engine_ready(self, handle: TrtHandle, measured: Optional[int]) -> None:
        engine = handle.engine
        handle.scratch_bytes = int(getattr(engine, "device_memory_size_v2", 0) or 0)
        handle.device_bytes = max(handle.plan_nbytes, measured or 0) if handle.plan_nbytes else (measured or 0)
        if handle.plan is not None:
            handle.host_bytes = handle.plan_nbytes
        handle.wrapper = TrtModel(self, handle)
        with self._lock:
            self._resident[id(handle)] = handle.scratch_bytes
            largest = max(self._resident.values(), default=0)
        self.scratch.resize(align(largest))

    def _check_compatible(self, handle: TrtHandle) -> None:
        if not handle.sidecar:
            return
        running = self._env(handle.trt)
        problems = mismatches(handle.sidecar, running)
        if not problems:
            return
        if handle.source_onnx and os.path.exists(handle.source_onnx) and handle.build_options is not None:
            import logging
            logging.getLogger("modelcache").warning("model %r: plan built for another environment (%s); "
                                                    "rebuilding from %s", handle.name, "; ".join(problems),
                                                    handle.source_onnx)
            self._take_built(handle, self._build_cache(handle.trt, {}))
            handle.rebuilds += 1
            with self._lock:
                self.counters["rebuilds"] += 1
            return
        raise EngineCompatibilityError("the plan was built for another environment: " + "; ".join(problems) +
                                       " (register the source .onnx to rebuild it automatically)", model=handle.name)

    def _to_host_impl(self, handle: TrtHandle) -> None:
        if handle.plan is None:                # only an engine was given: serialize it once
            with logger_for(handle.trt).capture() as log:
                plan = handle.engine.serialize()
            if plan is None:
                raise BackendError("TensorRT could not serialize the engine: " + " | ".join(log.errors(handle.trt)),
                                   model=handle.name)
            handle.plan, handle.plan_nbytes = plan, _nbytes(plan)
            handle.serializations += 1
            with self._lock:
                self.counters["serializations"] += 1
        self._drop_engine(handle)
        handle.host_bytes = handle.plan_nbytes

    def _drop_engine(self, handle: TrtHandle) -> None:
        if handle.wrapper is not None:
            handle.wrapper.valid = False
            handle.wrapper = None
        with handle.contexts_lock:
            contexts, handle.contexts = handle.contexts, []
        for ctx in contexts:
            ctx.close(self)
        handle.engine = None
        if handle.allocation is not None:
            handle.allocation.free()
            handle.allocation = None
        with self._lock:
            self._resident.pop(id(handle), None)
            largest = max(self._resident.values(), default=0)
        self.scratch.resize(align(largest))

    def _to_disk_impl(self, handle: TrtHandle, directory: str) -> None:
        plan_path = model_file(directory, handle.name, ".plan")
        digest = atomic_write(plan_path, memoryview(handle.plan))
        sidecar = dict(handle.sidecar or {k: None for k in ("trt_module", "trt_version", "cuda_version",
                                                            "gpu_name", "compute_capability")})
        sidecar.update({"format": 1, "plan_sha256": digest, "onnx_path": handle.source_onnx,
                        "model": handle.name})
        try:
            write_sidecar(plan_path + ".json", sidecar)
        except BaseException:
            remove_quietly(plan_path)
            raise
        handle.files = {"plan": (plan_path, digest)}
        handle.sidecar, handle.disk_path = sidecar, plan_path
        handle.plan = None

    def _from_disk_impl(self, handle: TrtHandle) -> None:
        plan_path, digest = handle.files["plan"]
        sidecar = read_sidecar(plan_path + ".json")
        if sidecar is None or sidecar.get("plan_sha256") != digest:
            raise CorruptFileError(f"the sidecar {plan_path}.json is missing or does not match the plan",
                                   model=handle.name)
        data = read_verified(plan_path, digest, model=handle.name)
        handle.plan, handle.plan_nbytes, handle.sidecar = data, len(data), sidecar
        handle.host_bytes = handle.plan_nbytes
        remove_quietly(plan_path)
        remove_quietly(plan_path + ".json")
        handle.files, handle.disk_path = {}, None

    def _release_impl(self, handle: TrtHandle) -> None:
        try:
            self._drop_engine(handle)
        except Exception:
            pass
        handle.plan = None
        for path, _ in handle.files.values():
            remove_quietly(path)
            remove_quietly(path + ".json")
        handle.files = {}

    def _model_impl(self, handle: TrtHandle) -> TrtModel:
        assert handle.wrapper is not None
        return handle.wrapper

    def stats(self) -> Dict[str, int]:
        with self._lock:
            out = dict(self.counters)
        out.update({"scratch.bytes": self.scratch.total_bytes, "scratch.slot_bytes": self.scratch.slot_bytes,
                    "scratch.peak_slots": self.scratch.peak_slots,
                    "build_cache.hits": sum(c.hits for c in self._builds.values()),
                    "build_cache.builds": sum(c.builds for c in self._builds.values())})
        return out

    def close(self) -> None:
        self.scratch.close()
        self.streams.close()

    # runtime pieces ---------------------------------------------------------------------------------
    def _runtime(self, trt: Any) -> Any:
        with self._lock:
            runtime = self._runtimes.get(id(trt))
            if runtime is None:
                runtime = self._runtimes[id(trt)] = trt.Runtime(logger_for(trt))
            return runtime

    def _env(self, trt: Any) -> Dict[str, Any]:
        with self._lock:
            env = self._envs.get(id(trt))
        if env is None:
            env = environment(trt, self.context.device, not self.on_gpu)
            with self._lock:
                self._envs[id(trt)] = env
        return env

    @contextlib.contextmanager
    def _context(self, handle: TrtHandle) -> Iterator[_Context]:
        with handle.contexts_lock:
            ctx = handle.contexts.pop() if handle.contexts else None
        if ctx is None:
            trt, engine = handle.trt, handle.engine
            strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
            with logger_for(trt).capture() as log:
                context = engine.create_execution_context(strategy) if strategy is not None \
                    else engine.create_execution_context()
            if context is None:
                raise BackendError("TensorRT could not create an execution context: " +
                                   " | ".join(log.errors(trt)), model=handle.name)
            ctx = _Context(context)
        try:
            yield ctx
        finally:
            with handle.contexts_lock:
                if handle.engine is not None:
                    handle.contexts.append(ctx)
                    ctx = None  # type: ignore[assignment]
            if ctx is not None:
                ctx.close(self)

    def _bind_scratch(self, context: Any, scratch: Tuple[int, int]) -> None:
        ptr, size = scratch
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(ptr, size)
        else:  # TensorRT 10.0
            context.device_memory = ptr

    def _execute(self, handle: TrtHandle, context: Any, stream: Optional[int] = None) -> None:
        trt = handle.trt
        handle_stream = stream if stream is not None else (
            as_int(self.streams.get(self.context.device).handle) if self.on_gpu else 0)
        with logger_for(trt).capture() as log:
            ok = context.execute_async_v3(handle_stream)
        if not ok:
            raise BackendError("TensorRT failed to run the engine: " + " | ".join(log.errors(trt)), model=handle.name)

    def _alloc_io(self, nbytes: int) -> Tuple[Any, int]:
        if self.on_gpu:
            buf = DeviceBuffer(nbytes, self.context.device)
            return buf, buf.ptr
        array = np.empty(nbytes, dtype=np.uint8)      # a simulated device has host memory behind it
        return array, array.ctypes.data

    def _alloc_scratch(self, nbytes: int) -> Tuple[Any, int]:
        if self.on_gpu:
            return self._alloc_io(nbytes)
        allocation = self.context.monitor.allocate(nbytes, owner="tensorrt-scratch")  # type: ignore[attr-defined]
        return allocation, next(self._fake_addresses)  # accounted, never dereferenced

    def _free_io(self, keep: Any) -> None:
        if hasattr(keep, "free"):
            keep.free()

    def _copy_in(self, ptr: int, array: np.ndarray) -> None:
        if self.on_gpu:
            self.streams.get(self.context.device).copy_to_device(ptr, array.ctypes.data, array.nbytes)
        else:
            ctypes.memmove(ptr, array.ctypes.data, array.nbytes)

    def _copy_out(self, array: np.ndarray, ptr: int) -> None:
        if self.on_gpu:
            self.streams.get(self.context.device).copy_to_host(array.ctypes.data, ptr, array.nbytes)
        else:
            ctypes.memmove(array.ctypes.data, ptr, array.nbytes)

    def _sync(self) -> None:
        if self.on_gpu:
            self.streams.get(self.context.device).synchronize()


def _nbytes(plan: Any) -> int:
    nbytes = getattr(plan, "nbytes", None)
    return int(nbytes) if nbytes is not None else len(plan)
