"""TensorRT at run time: choosing the TensorRT module, capturing its log, and what ``use()`` hands
out (:class:`TrtModel`) with its execution contexts and the scratch memory shared by every engine.

Code is written against the standard ``tensorrt`` module (>= 10); TensorRT-RTX
(``tensorrt_rtx_bindings``) is accepted too, and any module with the same API can be passed as
``trt_module`` (the tests pass a double of the runtime API).
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from ...devices.cuda import device_pointer
from ...errors import BackendError, ModelCacheError, ModelInputError

if TYPE_CHECKING:  # pragma: no cover
    from .backend import TensorRTBackend, TrtHandle

_MODULES = ("tensorrt", "tensorrt_rtx_bindings")


def import_trt(module: Union[None, str, Any] = None) -> Any:
    """The TensorRT module: ``module`` itself, a module name, or the first of ``tensorrt`` (>= 10)
    and ``tensorrt_rtx_bindings`` that imports."""
    if module is not None and not isinstance(module, str):
        return module
    names = [module] if module else list(_MODULES)
    problems = []
    for name in names:
        try:
            trt = importlib.import_module(name)
        except ImportError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if not hasattr(trt, "Runtime"):
            problems.append(f"{name}: no Runtime (a stub package?)")
            continue
        if name == "tensorrt" and _major(getattr(trt, "__version__", "0")) < 10:
            problems.append(f"tensorrt {trt.__version__} is older than 10")
            continue
        return trt
    raise ModelCacheError("no usable TensorRT module (" + "; ".join(problems) + "): pip install "
                          "'modelcache[tensorrt]' (tensorrt>=10) or tensorrt-rtx-cu13-bindings, or pass trt_module=")


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


class CapturingLogger:
    """A TensorRT ILogger that keeps what TensorRT says, per thread, so a failed call can raise an
    error carrying TensorRT's own message (TensorRT returns None and only logs)."""

    def __new__(cls, trt: Any) -> Any:
        base = trt.ILogger

        class _Logger(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                base.__init__(self)
                self._local = threading.local()
                self.recent: List[str] = []
                self._lock = threading.Lock()

            def log(self, severity: Any, msg: str) -> None:
                text = f"[{getattr(severity, 'name', severity)}] {msg}"
                lines = getattr(self._local, "lines", None)
                if lines is not None:
                    lines.append((severity, text))
                with self._lock:
                    self.recent.append(text)
                    del self.recent[:-200]

            def capture(self) -> "_Capture":
                return _Capture(self)

        return _Logger()


class _Capture:
    """``with logger.capture() as lines``: what TensorRT logs on this thread meanwhile."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger
        self.lines: List[Tuple[Any, str]] = []

    def __enter__(self) -> "_Capture":
        self._saved = getattr(self._logger._local, "lines", None)
        self._logger._local.lines = self.lines
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger._local.lines = self._saved

    def errors(self, trt: Any) -> List[str]:
        """Error-level lines, or all lines if none is an error."""
        error_levels = {getattr(getattr(trt.ILogger, "Severity", None), n, None) for n in ("ERROR", "INTERNAL_ERROR")}
        errs = [text for sev, text in self.lines if sev in error_levels or "ERROR" in str(sev)]
        return errs or [text for _, text in self.lines]


_loggers: Dict[int, Any] = {}
_loggers_lock = threading.Lock()


def logger_for(trt: Any) -> Any:
    """One capturing logger per TensorRT module (TensorRT wants a single logger per process)."""
    with _loggers_lock:
        logger = _loggers.get(id(trt))
        if logger is None:
            logger = _loggers[id(trt)] = CapturingLogger(trt)
        return logger


def iter_io(engine: Any, trt: Any) -> Iterator[Tuple[str, bool]]:
    """``(name, is_input)`` for each I/O tensor of ``engine``."""
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        yield name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT


class _Context:
    """An execution context with its I/O buffers (reused across runs while large enough)."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.buffers: Dict[str, Tuple[Any, int, int]] = {}   # name -> (keepalive, ptr, nbytes)

    def buffer(self, backend: "TensorRTBackend", name: str, nbytes: int) -> int:
        held = self.buffers.get(name)
        if held is None or held[2] < nbytes:
            if held is not None:
                held[0].free()
            buffer = backend.memory.allocate(max(nbytes, 1), owner="tensorrt-io")
            held = self.buffers[name] = (buffer, buffer.ptr, max(nbytes, 1))
        return held[1]

    def close(self) -> None:
        for buffer, _, _ in self.buffers.values():
            buffer.free()
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
                buffer = self._backend.memory.allocate(size, owner="tensorrt-scratch")
                slot = (buffer, buffer.ptr, size)
                with self._lock:
                    self.total_bytes += size
            yield slot[1], slot[2]
        finally:
            with self._lock:
                self.busy -= 1
                stale = slot is not None and slot[2] != self.slot_bytes   # engines changed meanwhile
                if slot is not None and not stale:
                    self._idle.append(slot)
            if stale and slot is not None:
                self._free(slot)

    def _free(self, slot: Tuple[Any, int, int]) -> None:
        slot[0].free()
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
        memory = backend.memory
        with self._execution() as ctx:
            context = ctx.context
            host_in = {}
            for name, value in feeds.items():
                array = np.ascontiguousarray(value, dtype=self._dtypes[name])
                host_in[name] = array
                context.set_input_shape(name, tuple(array.shape))
                ptr = ctx.buffer(backend, name, array.nbytes)
                memory.copy_to_device(ptr, array.ctypes.data, array.nbytes)
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
                memory.copy_to_host(array.ctypes.data, ptr, array.nbytes)
            memory.synchronize()
        return {name: outputs[name][0] for name in wanted}

    def run_device(self, inputs: Dict[str, Any], outputs: Dict[str, Any], shapes: Optional[Dict[str, Any]] = None,
                   stream: int = 0) -> None:
        """Run on device memory you own. ``inputs``/``outputs``: name -> address or array with
        ``__cuda_array_interface__``; ``shapes`` gives input shapes for raw addresses."""
        self._alive()
        backend, handle = self._backend, self._handle
        with self._execution() as ctx:
            context = ctx.context
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

    @contextlib.contextmanager
    def _execution(self) -> Iterator[Any]:
        """An execution context of the engine (its I/O buffers kept with it), in the device's
        context, with a slot of the shared scratch memory bound to it for the run."""
        backend, handle = self._backend, self._handle
        with backend.memory.device_context(), backend.scratch.slot(handle.scratch_bytes) as scratch, \
                backend._context(handle) as ctx:
            backend._bind_scratch(ctx.context, scratch)
            yield ctx

    def _alive(self) -> None:
        if not self.valid:
            raise ModelCacheError("this engine object was used after its lease ended and the model moved; use it "
                                  "only inside `with cache.use(...)`", model=self.name)
