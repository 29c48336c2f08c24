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

Files: ``runtime.py`` (the TensorRT module, its log, what ``use()`` hands out, scratch memory),
``plans.py`` (plan files, sidecars, compatibility), ``build.py`` (ONNX -> plan, the build cache).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..._fileio import read_verified
from ...devices.host import align
from ...errors import (BackendError, ConfigError, EngineCompatibilityError, EngineDeserializationError,
                       ModelRunError, UnsupportedModelError)
from ...tiers import Tier
from ..base import Backend, BackendContext, Handle
from .build import BuildCache, BuildOptions
from .plans import environment, mismatches, read_plan, read_sidecar, remove_plan, write_plan
from .runtime import ScratchPool, TrtModel, _Context, import_trt, logger_for

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
        self.charge: Any = None                 # devices.Charge for the engine's device bytes
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


class TensorRTBackend(Backend):
    """TensorRT engines; see the module docstring."""

    name = "tensorrt"

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.memory = context.memory
        self.scratch = ScratchPool(self)
        self._runtimes: Dict[int, Any] = {}
        self._envs: Dict[int, Dict[str, Any]] = {}
        self._builds: Dict[Tuple[str, int], BuildCache] = {}
        self._lock = threading.Lock()
        self._resident: Dict[int, int] = {}    # id(handle) -> scratch bytes, engines on the device
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
                cache = self._builds[key] = BuildCache(folder, trt, self.memory.describe())
            return cache

    # moves ------------------------------------------------------------------------------------------
    def _to_device_impl(self, handle: TrtHandle) -> None:
        self._check_compatible(handle)
        trt = handle.trt
        runtime = self._runtime(trt)
        with logger_for(trt).capture() as log:
            engine, charge = self.memory.measure(lambda: runtime.deserialize_cuda_engine(handle.plan),
                                                 expected_bytes=handle.plan_nbytes, owner=handle.name)
        if engine is None:
            charge.free()
            with self._lock:
                self.counters["deserialization_errors"] += 1
            messages = log.errors(trt)
            raise EngineDeserializationError(
                "TensorRT could not deserialize the plan: " + " | ".join(messages[-4:] or ["(no message)"]),
                model=handle.name, trt_messages=messages)
        with self._lock:
            self.counters["deserializations"] += 1
        if handle.sidecar is None:      # it runs here: record where, for the disk tier's sidecar
            handle.sidecar = dict(self._env(trt))
        handle.engine, handle.charge = engine, charge
        self._engine_ready(handle, charge.nbytes)

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
            ctx.close()
        handle.engine = None
        if handle.charge is not None:
            handle.charge.free()
            handle.charge = None
        with self._lock:
            self._resident.pop(id(handle), None)
            largest = max(self._resident.values(), default=0)
        self.scratch.resize(align(largest))

    def _to_disk_impl(self, handle: TrtHandle, directory: str) -> None:
        sidecar = dict(handle.sidecar or {k: None for k in ("trt_module", "trt_version", "cuda_version",
                                                            "gpu_name", "compute_capability")})
        sidecar["onnx_path"] = handle.source_onnx
        plan_path, digest, sidecar = write_plan(directory, handle.name, handle.plan, sidecar)
        handle.files = {"plan": (plan_path, digest)}
        handle.sidecar, handle.disk_path = sidecar, plan_path
        handle.plan = None

    def _from_disk_impl(self, handle: TrtHandle) -> None:
        plan_path, digest = handle.files["plan"]
        data, sidecar = read_plan(plan_path, digest, handle.name)
        handle.plan, handle.plan_nbytes, handle.sidecar = data, len(data), sidecar
        handle.host_bytes = handle.plan_nbytes
        remove_plan(plan_path)
        handle.files, handle.disk_path = {}, None

    def _release_impl(self, handle: TrtHandle) -> None:
        try:
            self._drop_engine(handle)
        except Exception:
            pass
        handle.plan = None
        for path, _ in handle.files.values():
            remove_plan(path)
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
            env = environment(trt, self.memory.describe())
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
                    ctx = None
            if ctx is not None:
                ctx.close()

    def _bind_scratch(self, context: Any, scratch: Tuple[int, int]) -> None:
        ptr, size = scratch
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(ptr, size)
        else:  # TensorRT 10.0
            context.device_memory = ptr

    def _execute(self, handle: TrtHandle, context: Any, stream: Optional[int] = None) -> None:
        trt = handle.trt
        with logger_for(trt).capture() as log:
            ok = context.execute_async_v3(stream if stream is not None else self.memory.stream_handle())
        if not ok:
            raise ModelRunError("TensorRT failed to run the engine: " + " | ".join(log.errors(trt)), model=handle.name)


def _nbytes(plan: Any) -> int:
    nbytes = getattr(plan, "nbytes", None)
    return int(nbytes) if nbytes is not None else len(plan)
