"""What ``use()`` hands out for an ONNX Runtime model: an object that runs like an
``InferenceSession`` (with the original model's input and output names), whichever swap mode
serves it.

Inputs are checked against the model's declared names, element types and shapes before a run
(a mismatch is a :class:`ModelInputError`). In weights mode the weights are bound once per
residency: runs take a binding with the weights already bound from a small pool (one per run in
flight), bind their own inputs and give it back.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...devices.base import Runner
from ...devices.cuda import device_pointer
from ...errors import ModelCacheError, ModelInputError, ModelRunError
from .graph import ValueInfo, Weight, numpy_dtype


class InputSpec:
    """What a run checks each input against: its numpy dtype (None: not checked) and shape (an
    int per fixed dimension, None per symbolic one; None for an unknown rank)."""

    __slots__ = ("name", "dtype", "shape", "declared", "exact")

    def __init__(self, info: Any) -> None:
        self.name = info.name
        self.declared = f"{info.type}{list(info.shape) if info.shape is not None else ''}"
        dtype = numpy_dtype(info.type)
        self.dtype = np.dtype(dtype) if dtype is not None else None
        self.shape = None if info.shape is None else tuple(d if isinstance(d, int) and d > 0 else None
                                                           for d in info.shape)
        # the one shape a fully declared input takes (the fast check); None: checked dimension by dimension
        self.exact = self.shape if self.shape is not None and None not in self.shape else None

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` does not fit, or None."""
        if self.dtype is not None and value.dtype != self.dtype:
            return f"dtype {value.dtype}, expected {self.dtype}"
        if self.shape is not None:
            if value.ndim != len(self.shape) or any(e is not None and e != g for e, g in zip(self.shape, value.shape)):
                expected = "[" + ", ".join("?" if e is None else str(e) for e in self.shape) + "]"
                return f"shape {list(value.shape)}, expected {expected}"
        return None


class OrtModel:
    """What ``use()`` hands out: runs like an ``InferenceSession``.

    ``run(output_names, input_feed)`` takes and returns numpy arrays with the original model's
    names. :meth:`io_binding` gives an IOBinding with the weights already bound, for callers
    that keep inputs and outputs on the GPU (bind them, then :meth:`run_with_iobinding`).
    """

    def __init__(self, name: str, session: Any, weights: Sequence[Weight], device: Optional[Tuple[str, int]],
                 weight_base: Any, input_names: List[str], output_names: List[str], run_options: Any = None,
                 runner: Optional[Runner] = None, gate: Any = None,
                 signature: Optional[Tuple[List[Any], List[Any]]] = None,
                 working: Optional[Tuple[Any, int, Any]] = None, callers: Any = None,
                 context: Optional[Callable[[], ContextManager[None]]] = None) -> None:
        self.name = name
        self._context = context           # DeviceMemory.device_context of a device session; None on the host
        self._signature = signature      # the original model's inputs and outputs (a shared graph's are generic)
        self._gate = gate
        self._runner = runner             # the session's runner (its own thread on a GPU), or None: the caller's
        self._callers = callers           # callers.CallerThreads: threads that run the session themselves
        self._run_options = run_options   # default RunOptions (e.g. arena shrinkage after each run)
        self._session = session
        self._weights = list(weights)
        self._device = device            # (device type, id) with weight_base an address there; None: host arrays
        self._weight_base = weight_base  # int device address, or HostBlock
        self._input_names = input_names
        self._output_names = output_names
        declared = signature[0] if signature is not None else [
            i for i in session.get_inputs() if i.name in set(input_names)]
        self._specs: Dict[str, InputSpec] = {i.name: InputSpec(i) for i in declared}
        self._required = {i.name for i in session.get_inputs() if i.name in set(input_names)}
        # free (binding, its run call) with the weights bound: a pool, one per run in flight (_pooled)
        self._bindings: List[Tuple[Any, Callable[[Any, Any], None]]] = []
        self._working = working          # (DeviceMemory, bytes a run takes, key): counted while a run holds it
        self._lock = threading.Lock()
        self.valid = True

    # InferenceSession look-alikes ------------------------------------------------------------
    def get_inputs(self) -> List[Any]:
        """The model's inputs (name, type, shape) as the original model declares them."""
        self._alive()
        if self._signature is not None:
            return list(self._signature[0])
        names = set(self._input_names)
        return [i for i in self._session.get_inputs() if i.name in names]

    def get_outputs(self) -> List[Any]:
        self._alive()
        if self._signature is not None:
            return list(self._signature[1])
        outputs: List[Any] = self._session.get_outputs()
        return outputs

    def get_providers(self) -> List[str]:
        self._alive()
        providers: List[str] = self._session.get_providers()
        return providers

    def get_modelmeta(self) -> Any:
        self._alive()
        return self._session.get_modelmeta()

    def run(self, output_names: Optional[Sequence[str]], input_feed: Dict[str, Any],
            run_options: Any = None) -> List[np.ndarray]:
        """Run with numpy inputs; returns numpy outputs (all outputs when ``output_names`` is None)."""
        feed = self._checked(input_feed)
        if output_names:
            names = list(output_names)
            unknown = [n for n in names if n not in self._output_names]
            if unknown:
                raise ModelInputError(f"unknown output(s) {unknown}; the model's outputs are {self._output_names}",
                                      model=self.name)
        else:
            names = self._output_names
        if run_options is None:
            run_options = self._run_options
        try:
            if not self._weights:
                outputs: List[np.ndarray] = self._on_runner(self._session.run, names, feed, run_options)
                return outputs
            # binding included: ONNX Runtime copies CPU inputs to the device when they are bound, and
            # its CUDA provider keeps device memory for every thread that does so: on the runner
            # thread, that is one thread per session, not one per caller
            outputs = self._on_runner(self._bind_and_run, names, feed, run_options)
            return outputs
        except ModelCacheError:
            raise
        except Exception as exc:   # the inputs were checked: the runtime itself failed
            raise ModelRunError(f"ONNX Runtime failed to run the model: {type(exc).__name__}: {str(exc)[:500]}",
                                model=self.name) from exc

    def _bind_and_run(self, names: List[str], feed: Dict[str, np.ndarray], run_options: Any) -> List[np.ndarray]:
        pool = self._bindings
        binding, run = pool.pop() if pool else self._pooled()
        for key, value in feed.items():
            binding.bind_input(key, value)
        cpu = _CPU[0]
        for out in names:
            binding.bind_output(out, cpu)
        try:
            run(binding, run_options)
            # ONNX Runtime's own CPU buffers as numpy arrays, as InferenceSession.run returns them
            # (copy_outputs_to_cpu would copy each once more: 384 KiB a run for BERT-base); each
            # array keeps its buffer alive, so the binding's next run cannot overwrite it
            values = binding.get_outputs()
            outputs: List[np.ndarray] = [values[i].numpy() for i in range(len(values))]
        finally:
            binding.clear_binding_outputs()
        if feed.keys() == self._required and self.valid:
            pool.append((binding, run))   # its data inputs are rebound by the next run
        return outputs

    def _pooled(self) -> Tuple[Any, Callable[[Any, Any], None]]:
        """A binding with the weights bound for :meth:`_bind_and_run`, and the call that runs it:
        ONNX Runtime's pybind objects behind its Python wrappers where it has them (a layer of
        Python less for each of a run's calls), else the wrappers."""
        binding = self._new_binding()
        raw, raw_run = getattr(binding, "_iobinding", None), getattr(getattr(self._session, "_sess", None),
                                                                    "run_with_iobinding", None)
        if raw is not None and raw_run is not None and _raw_cpu_device() is not None:
            return raw, raw_run
        session = self._session
        return _PublicBinding(binding), lambda b, options: session.run_with_iobinding(b.binding, options)

    def prime(self) -> None:
        """Bind the weights now (a binding for the first run), so the first run after a swap-in
        does not pay for it."""
        if self._weights and not self._bindings:
            self._bindings.append(self._pooled())

    def io_binding(self) -> Any:
        """A fresh IOBinding with every weight bound (on the device, or from host memory). For a
        session on a device its calls run in the device's own context, and a caller's own CUDA
        context (``pycuda.autoinit``) is current again after each (ONNX Runtime would otherwise
        put the primary context in its place on the caller's thread)."""
        if self._context is not None:
            with self._context():
                return _CallerContextKept(self._new_binding(), self._context)
        return self._new_binding()

    def _new_binding(self) -> Any:
        """ONNX Runtime's IOBinding with every weight bound (on the device, or from host memory)."""
        self._alive()
        binding = self._session.io_binding()
        for w in self._weights:
            if self._device is not None:
                binding.bind_input(w.name, self._device[0], self._device[1], np.dtype(w.dtype), list(w.shape),
                                   self._weight_base + w.offset)
            else:
                binding.bind_cpu_input(w.name, self._weight_base.view(w.offset, w.nbytes, w.dtype, w.shape))
        return binding

    def run_with_iobinding(self, binding: Any, run_options: Any = None) -> None:
        self._alive()
        if isinstance(binding, _CallerContextKept):
            binding = binding.binding
        self._on_runner(self._session.run_with_iobinding, binding,
                        run_options if run_options is not None else self._run_options)

    def _on_runner(self, fn: Any, *args: Any) -> Any:
        if self._runner is None:
            return fn(*args)
        callers = self._callers
        if callers is not None:
            if callers.member():
                return self._run_here(fn, args)
            ran, result = callers.join(fn, args)     # becomes one, if it may (that first run measured)
            if ran:
                return result
        return self._runner.call(self._gated, fn, *args)

    def _run_here(self, fn: Any, args: Tuple[Any, ...]) -> Any:
        """``fn(*args)`` on this caller thread, in the device's context (see :meth:`_gated`)."""
        if self._context is None:
            return self._gated(fn, *args, thread=threading.get_ident())
        with self._context():
            return self._gated(fn, *args, thread=threading.get_ident())

    def _gated(self, fn: Any, *args: Any, thread: Optional[int] = None) -> Any:
        """``fn(*args)`` with the gate held for reading (a run's allocations never overlap a memory
        measurement) and its working memory counted: once per session for runs on its runner (they
        take turns), once per thread for runs on caller threads (they run beside the runner's).
        Begin/end calls rather than context managers: it is the hot path of every run."""
        gate = self._gate
        gate.acquire_read()
        try:
            if self._working is None:
                return fn(*args)
            memory, nbytes, key = self._working
            if thread is not None:
                key = (key, thread)
            memory.begin_working(nbytes, key, self.name)
            try:
                return fn(*args)
            finally:
                memory.end_working(key)
        finally:
            gate.release_read()

    def bind_device_input(self, binding: Any, name: str, array: Any, dtype: Any = None,
                          shape: Optional[Sequence[int]] = None) -> None:
        """Bind a GPU array (torch, CuPy: ``__cuda_array_interface__``; a pycuda allocation or raw
        address with ``dtype`` and ``shape``) as input ``name``."""
        if name not in self._input_names:
            raise ModelInputError(f"unknown input {name!r}; the model's inputs are {self._input_names}",
                                  model=self.name)
        iface = getattr(array, "__cuda_array_interface__", None)
        if iface is not None:
            dtype = np.dtype(iface["typestr"]) if dtype is None else dtype
            shape = iface["shape"] if shape is None else shape
        if dtype is None or shape is None:
            raise ModelInputError(f"input {name!r}: give dtype and shape with a raw device pointer", model=self.name)
        spec = self._specs.get(name)
        problem = spec.problem(_Shaped(np.dtype(dtype), tuple(shape))) if spec is not None else None
        if problem:
            raise ModelInputError(f"input {name!r}: {problem} (declared {spec.declared})",  # type: ignore[union-attr]
                                  model=self.name)
        device = self._device or ("cuda", 0)
        binding.bind_input(name, device[0], device[1], np.dtype(dtype), list(shape), device_pointer(array))

    # checks ------------------------------------------------------------------------------------
    def retire(self) -> None:
        """The lease is over and the model moved: refuse further use, let the session go."""
        self.valid = False
        self._session = None
        self._bindings = []

    def _alive(self) -> None:
        if not self.valid:
            raise ModelCacheError("this model object was used after its lease ended and the model moved; "
                                  "use it only inside `with cache.use(...)`", model=self.name)

    def _checked(self, feed: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """The feed as contiguous numpy arrays, checked against the declared inputs."""
        if not self.valid:
            self._alive()
        if type(feed) is dict and feed.keys() == self._required:    # the usual feed: a fast check
            specs = self._specs
            for key, value in feed.items():
                spec = specs.get(key)
                if not (type(value) is np.ndarray and value.flags.c_contiguous
                        and (spec is None or (value.dtype == spec.dtype and (
                            value.shape == spec.exact if spec.exact is not None else spec.problem(value) is None)))):
                    break
            else:
                return feed
        if not isinstance(feed, dict):
            raise ModelInputError(f"input_feed must be a dict of name -> array, not {type(feed).__name__}",
                                  model=self.name)
        unknown = [k for k in feed if k not in self._input_names]
        missing = [k for k in self._required if k not in feed]
        if unknown or missing:
            raise ModelInputError(f"bad inputs: unknown {unknown}, missing {sorted(missing)}; the model's "
                                  f"inputs are {self._input_names}", model=self.name)
        out = {}
        for key, value in feed.items():
            array = np.ascontiguousarray(value)
            spec = self._specs.get(key)
            problem = spec.problem(array) if spec is not None else None
            if problem:
                raise ModelInputError(f"input {key!r}: {problem} (declared {spec.declared})",  # type: ignore[union-attr]
                                      model=self.name)
            out[key] = array
        return out

    def __repr__(self) -> str:
        if not self.valid:
            return f"OrtModel({self.name!r}, retired)"
        return f"OrtModel({self.name!r}, providers={self.get_providers()})"


#: ONNX Runtime's CPU device object for binding outputs (its pybind ``OrtDevice``), once built
_CPU: List[Any] = [None]


def _raw_cpu_device() -> Any:
    """The CPU ``OrtDevice`` that ONNX Runtime's pybind ``bind_output`` takes, or None where this
    ONNX Runtime does not have it in that form (runs then go through its Python wrappers)."""
    if _CPU[0] is None:
        try:
            from onnxruntime.capi import _pybind_state as C
            _CPU[0] = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        except Exception:
            return None
    return _CPU[0]


class _PublicBinding:
    """The calls :meth:`OrtModel._bind_and_run` makes on a binding, through ONNX Runtime's
    public IOBinding (where its pybind object is not reachable)."""

    __slots__ = ("binding",)

    def __init__(self, binding: Any) -> None:
        self.binding = binding

    def bind_input(self, name: str, value: np.ndarray) -> None:
        self.binding.bind_cpu_input(name, value)

    def bind_output(self, name: str, device: Any) -> None:
        self.binding.bind_output(name, "cpu")

    def get_outputs(self) -> List[Any]:
        outputs: List[Any] = self.binding.get_outputs()
        return outputs

    def clear_binding_outputs(self) -> None:
        self.binding.clear_binding_outputs()


class _CallerContextKept:
    """ONNX Runtime's IOBinding, each of whose calls runs in the device's own context
    (``context``: :meth:`DeviceMemory.device_context`) and gives the calling thread its own
    context back (see :func:`devices.cuda.in_primary_context`)."""

    __slots__ = ("binding", "context")

    def __init__(self, binding: Any, context: Callable[[], ContextManager[None]]) -> None:
        self.binding, self.context = binding, context

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.binding, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.context():
                return attr(*args, **kwargs)
        return call


class _Shaped:
    """A dtype and shape, checked like an array (for inputs that live on the device)."""

    def __init__(self, dtype: np.dtype, shape: Tuple[int, ...]) -> None:
        self.dtype, self.shape, self.ndim = dtype, shape, len(shape)


__all__ = ["OrtModel", "InputSpec", "ValueInfo"]
