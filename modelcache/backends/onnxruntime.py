"""The "onnxruntime" backend: ONNX models moved between the GPU, host RAM and disk.

Loader results: a path to an ``.onnx`` file (external data beside it is read too), model bytes,
an ``onnx.ModelProto``, or an ``onnxruntime.InferenceSession`` (its model path or bytes are
reused). At load, initializers of at least ``weights_threshold`` bytes (default 1 MiB) are moved
out of the graph into one host block (pinned on a GPU machine); then one of two swap modes runs:

``mode="weights"`` (the default where it is correct)
    The graph is rewritten so those initializers are graph inputs. One session is created once
    and kept; the device tier is one device buffer filled by an asynchronous copy from the
    pinned block, bound to the session's inputs through IOBinding. Swap-out frees the buffer;
    swap-in copies it back: at PCIe speed, with no session creation.

``mode="session"`` (the seed's recipe, done well)
    The device tier is a session on the device, created from the graph plus the weights held in
    host memory (``add_external_initializers_from_files_in_memory``: no file, no copy of the
    weights into the graph); the first device session saves an optimized model, and later ones
    load it with graph optimizations off. The host tier keeps the bytes (and, with
    ``host_session=True``, a CPU session that serves while the model is evicted).

``mode="auto"`` picks "weights" unless the rewrite fails or changes results: on first load both
forms run on a sample input on the CPU and their outputs are compared. ``info().details`` says
which mode a model runs in and why.

Without a GPU (a :class:`SimulatedDevice`), "device" sessions use the CPU provider, and the
device bytes are allocated on the simulated device.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._fileio import atomic_write, model_file, read_into, read_verified, remove_quietly
from ..cuda import DeviceBuffer, HostBlock, HostPool, PinnedPool, StreamPool, align, device_pointer
from ..errors import ConfigError, CorruptFileError, ModelCacheError, ModelInputError, UnsupportedModelError
from ..tiers import Tier
from .base import Backend, BackendContext, Handle

MiB = 1 << 20
WEIGHTS_FILE = "modelcache.weights"   # the external-data location the graph refers to
_OPTIONS = {"mode", "weights_threshold", "host_session", "verify", "provider_options", "session_options",
            "rtol", "atol", "size_hint", "shared_arena", "shrink_arena", "share_session", "share_threshold"}
_env_arenas: set = set()          # devices whose shared CUDA arena is registered with ONNX Runtime
_env_arenas_lock = threading.Lock()


class InvalidModelError(UnsupportedModelError):
    """The ONNX model is malformed, incomplete (missing external data) or rejected by ONNX Runtime."""


@dataclass(frozen=True)
class Weight:
    """One initializer moved out of the graph: where it sits in the host block."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


def _ort() -> Any:
    import onnxruntime
    return onnxruntime


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ModelCacheError("the onnxruntime backend needs the onnx package: "
                              "pip install 'modelcache[onnxruntime]'") from exc
    return onnx


class _SessionGroup:
    """One long-lived device session shared by every weights-mode model whose rewritten graph is
    the same up to tensor sizes (same operators, names and small constants; options equal).

    ONNX Runtime's CUDA provider keeps memory per session (cuBLAS/cuDNN handles and workspaces,
    arena: about 200 MiB on an H100 once it has run), so N models of one architecture pay it
    once. ``nbytes`` is that figure, measured when the session was created and first run. The
    first member (the owner) carries it in the cache's accounting; the group and its session
    (and its runner thread) go when the last member leaves."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.lock = threading.Lock()    # held while the session is created: one creation per group
        self.session: Any = None
        self.runner: Any = None         # the session's own thread on a GPU (its CUDA context lives there)
        self.allocation: Any = None     # simulated device: the session's bytes
        self.nbytes = 0
        self.members: List["OrtHandle"] = []
        self.pending = 0                # swap-ins joining it right now (keeps it from being dropped)
        self.warmup_error: Optional[str] = None


class OrtHandle(Handle):
    def __init__(self, name: str) -> None:
        super().__init__(name, Tier.HOST)
        self.mode = "weights"
        self.mode_reason = ""
        self.graph = b""                       # serialized graph (weights mode: weights as inputs)
        self.weights: List[Weight] = []
        self.weights_nbytes = 0                # bytes of the block in use: up to the end of the last weight
        self.block: Optional[HostBlock] = None          # the weights in host memory
        self.device_weights: Any = None                  # DeviceBuffer or SimulatedAllocation
        self.session: Any = None                # session mode: the device session
        self.group: Optional[_SessionGroup] = None       # weights mode: the shared session it uses
        self.group_key = ""
        self.new_group_bytes: Any = lambda: 0   # device bytes a swap-in adds if it must create the group's session
        self.sample_inputs: Optional[List[Tuple[str, Any, List[int]]]] = None   # for the warm-up run
        self.signature: Optional[Tuple[List["ValueInfo"], List["ValueInfo"]]] = None  # original inputs, outputs
        self.host_session: Any = None           # a CPU session serving while on the host
        self.optimized = False                  # session mode: graph saved optimized; load with opts off
        self.session_device_bytes = 0           # session mode: device memory the session itself took (measured)
        self.files: Dict[str, Tuple[str, str]] = {}    # disk tier: kind -> (path, sha256)
        self.wrapper: Optional["OrtModel"] = None
        self.host_wrapper: Optional["OrtModel"] = None
        self.input_names: List[str] = []
        self.output_names: List[str] = []
        self.serve_on_host = False
        self.runner: Any = None                 # session mode: the session's own thread on a GPU
        self.options: Dict[str, Any] = {}
        self.host_dir: Optional[str] = None     # session mode: model.onnx + weights file
        self.host_in_ram = True                 # host_dir is on tmpfs (counts as host memory)
        self.optimized_for_cpu = False

    # accounting: a shared session's bytes are carried by its group's first member -------------
    @property  # type: ignore[override]
    def device_bytes(self) -> int:
        return self._device_bytes + (self._group_bytes() if self.tier is Tier.DEVICE else 0)

    @device_bytes.setter
    def device_bytes(self, value: int) -> None:
        self._device_bytes = value

    def _group_bytes(self) -> int:
        """The group's session bytes if this handle carries them (it is the group's owner)."""
        group = self.group
        members = list(group.members) if group is not None else []   # a snapshot: others may join or leave
        return group.nbytes if group is not None and members and members[0] is self else 0

    def model_path(self) -> str:
        assert self.host_dir is not None
        return os.path.join(self.host_dir, "model.onnx")

    def estimated_device_bytes(self) -> int:
        if self.mode == "weights":
            return self.weights_nbytes + (self._group_bytes() if self.group is not None else self.new_group_bytes())
        return self.device_bytes or (self.weights_nbytes + self.session_device_bytes)

    def parked_device_bytes(self) -> int:
        return self._group_bytes() if self.tier is Tier.HOST else 0

    def unpark_frees_bytes(self) -> int:
        group = self.group
        return group.nbytes if group is not None and list(group.members) == [self] else 0

    def kept_after_eviction(self) -> int:
        return self._group_bytes()

    def estimated_host_bytes(self) -> int:
        if self.mode == "session":
            return self.weights_nbytes
        return self.block.nbytes if self.block is not None else align(self.weights_nbytes)

    def details(self) -> Dict[str, Any]:
        group = self.group
        shared = {"session_group": self.group_key[:12], "session_shared_by": len(group.members) if group else 0,
                  "session_device_bytes": group.nbytes if group else 0,
                  "session_warmup_error": group.warmup_error if group else None} if self.mode == "weights" else \
            {"session_device_bytes": self.session_device_bytes}
        return {"mode": self.mode, "mode_reason": self.mode_reason, "weights": len(self.weights),
                "weights_bytes": self.weights_nbytes, **shared,
                "pinned": bool(self.block is not None and self.block.pinned),
                "serves_on_host": self.host_session is not None, "optimized_graph": self.optimized}


class OrtModel:
    """What ``use()`` hands out: runs like an ``InferenceSession``.

    ``run(output_names, input_feed)`` takes and returns numpy arrays with the original model's
    names. :meth:`io_binding` gives an IOBinding with the weights already bound, for callers
    that keep inputs and outputs on the GPU (bind them, then :meth:`run_with_iobinding`).
    """

    def __init__(self, name: str, session: Any, weights: Sequence[Weight], device: Optional[Tuple[str, int]],
                 weight_base: Any, input_names: List[str], output_names: List[str], run_options: Any = None,
                 runner: Any = None, gate: Any = None, signature: Optional[Tuple[List[Any], List[Any]]] = None
                 ) -> None:
        self.name = name
        self._signature = signature      # the original model's inputs and outputs (a shared graph's are generic)
        self._gate = gate
        self._runner = runner             # the session's own thread (GPU), or None: run in the caller's
        self._run_options = run_options   # default RunOptions (e.g. arena shrinkage after each run)
        self._session = session
        self._weights = list(weights)
        self._device = device            # ("cuda", id) with weight_base a device address; None: host arrays
        self._weight_base = weight_base  # int device address, or HostBlock
        self._input_names = input_names
        self._output_names = output_names
        self._required = {i.name for i in session.get_inputs() if i.name in set(input_names)}
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
        return self._session.get_outputs()

    def get_providers(self) -> List[str]:
        self._alive()
        return self._session.get_providers()

    def get_modelmeta(self) -> Any:
        self._alive()
        return self._session.get_modelmeta()

    def run(self, output_names: Optional[Sequence[str]], input_feed: Dict[str, Any],
            run_options: Any = None) -> List[np.ndarray]:
        """Run with numpy inputs; returns numpy outputs (all outputs when ``output_names`` is None)."""
        self._check(input_feed)
        names = list(output_names) if output_names else self._output_names
        unknown = [n for n in names if n not in self._output_names]
        if unknown:
            raise ModelInputError(f"unknown output(s) {unknown}; the model's outputs are {self._output_names}",
                                  model=self.name)
        run_options = run_options if run_options is not None else self._run_options
        if not self._weights:
            return self._on_runner(self._session.run, names, input_feed, run_options)
        # binding included: ONNX Runtime copies CPU inputs to the device when they are bound, and
        # its CUDA provider keeps device memory for every thread that does so (~64 MiB each on an
        # H100): on the runner thread, that is one thread per session, not one per caller
        return self._on_runner(self._bind_and_run, names, input_feed, run_options)

    def _bind_and_run(self, names: List[str], input_feed: Dict[str, Any], run_options: Any) -> List[np.ndarray]:
        binding = self.io_binding()
        for key, value in input_feed.items():
            binding.bind_cpu_input(key, np.ascontiguousarray(value))
        for out in names:
            binding.bind_output(out, "cpu")
        self._session.run_with_iobinding(binding, run_options)
        return binding.copy_outputs_to_cpu()

    def io_binding(self) -> Any:
        """A fresh IOBinding with every weight bound (on the device, or from host memory)."""
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
        self._on_runner(self._session.run_with_iobinding, binding,
                        run_options if run_options is not None else self._run_options)

    def _on_runner(self, fn: Any, *args: Any) -> Any:
        if self._runner is None:
            return fn(*args)
        return self._runner.submit(self._gated, fn, *args).result()

    def _gated(self, fn: Any, *args: Any) -> Any:
        with self._gate.read():   # a run's allocations never overlap a memory measurement
            return fn(*args)

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
        device = self._device or ("cuda", 0)
        binding.bind_input(name, device[0], device[1], np.dtype(dtype), list(shape), device_pointer(array))

    # checks ------------------------------------------------------------------------------------
    def retire(self) -> None:
        """The lease is over and the model moved: refuse further use, let the session go."""
        self.valid = False
        self._session = None

    def _alive(self) -> None:
        if not self.valid:
            raise ModelCacheError("this model object was used after its lease ended and the model moved; "
                                  "use it only inside `with cache.use(...)`", model=self.name)

    def _check(self, feed: Dict[str, Any]) -> None:
        self._alive()
        if not isinstance(feed, dict):
            raise ModelInputError(f"input_feed must be a dict of name -> array, not {type(feed).__name__}",
                                  model=self.name)
        unknown = [k for k in feed if k not in self._input_names]
        missing = [k for k in self._required if k not in feed]
        if unknown or missing:
            raise ModelInputError(f"bad inputs: unknown {unknown}, missing {sorted(missing)}; the model's "
                                  f"inputs are {self._input_names}", model=self.name)

    def __repr__(self) -> str:
        if not self.valid:
            return f"OrtModel({self.name!r}, retired)"
        return f"OrtModel({self.name!r}, providers={self.get_providers()})"


class OnnxRuntimeBackend(Backend):
    """ONNX models; see the module docstring."""

    name = "onnxruntime"

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.on_gpu = not context.monitor.simulated
        self.pool: HostPool = PinnedPool() if self.on_gpu else HostPool()
        self.streams = StreamPool()
        self._gate = _Gate()    # device allocations and runs (shared) vs a memory measurement (exclusive)
        self._groups: Dict[str, _SessionGroup] = {}    # weights mode: shared sessions by graph key
        self._groups_lock = threading.Lock()
        self._session_bytes_seen = 0
        self._sessions_created = 0
        self._scratch: Optional[str] = None
        self._shm: Optional[str] = None
        self._scratch_lock = threading.Lock()

    # detection -----------------------------------------------------------------------------
    @classmethod
    def accepts(cls, value: Any, options: Dict[str, Any]) -> bool:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value).lower().endswith(".onnx")
        kind = f"{type(value).__module__}.{type(value).__name__}"
        if kind.startswith("onnx.") and type(value).__name__ == "ModelProto":
            return True
        if kind.startswith("onnxruntime.") and type(value).__name__ == "InferenceSession":
            return True
        return isinstance(value, (bytes, bytearray)) and _looks_like_onnx(bytes(value[:64]))

    # load: normalise, externalise the weights, choose the mode ----------------------------
    def _load_impl(self, name: str, value: Any, options: Dict[str, Any]) -> OrtHandle:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigError(f"unknown onnxruntime option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}",
                              model=name)
        mode = options.get("mode", "auto")
        if mode not in ("auto", "weights", "session"):
            raise ConfigError(f"mode={mode!r}; use 'auto', 'weights' or 'session'", model=name)
        threshold = int(options.get("weights_threshold", MiB))
        proto, base_dir = self._to_proto(name, value)
        handle = OrtHandle(name)
        handle.options = dict(options)
        initializers = {i.name for i in proto.graph.initializer}
        handle.input_names = [i.name for i in proto.graph.input if i.name not in initializers]
        handle.output_names = [o.name for o in proto.graph.output]
        handle.sample_inputs = _sample_specs(proto, handle.input_names)
        handle.signature = _signature(proto, handle.input_names)
        share = bool(options.get("share_session", True))
        try:
            # to share a session, models must not differ in constants: floating-point initializers
            # from share_threshold bytes up (biases, norms) become inputs too; small integer ones
            # (shapes, axes) stay in the graph and must match
            small = int(options.get("share_threshold", 1024)) if share and mode != "session" else None
            ext_graph, weights, block = self._externalize(name, proto, threshold, small, base_dir)
            del proto
            handle.weights, handle.block = weights, block
            # the span the weights use in the block: offsets are aligned, so this is more than the
            # sum of their sizes; files, copies and device buffers all take the whole span
            handle.weights_nbytes = weights[-1].offset + weights[-1].nbytes if weights else 0
            handle.host_bytes = block.nbytes if block is not None else 0
            candidate = None
            if mode == "session" or not weights:
                handle.mode = "session"
                handle.mode_reason = "requested" if mode == "session" else "no initializer above the threshold"
            else:
                weights_graph = _as_inputs(_onnx().load_from_string(ext_graph), weights, generic=share)
                reason = None
                if options.get("verify", True) or mode == "auto":
                    reason, candidate = self._verify(name, ext_graph, weights_graph, handle, options)
                if reason is None:
                    handle.mode = "weights"
                    handle.mode_reason = "requested" if mode == "weights" else "outputs match on a sample input"
                    ext_graph = weights_graph
                elif mode == "weights":
                    raise InvalidModelError(f"mode='weights' cannot be used: {reason}", model=name)
                else:
                    handle.mode, handle.mode_reason, candidate = "session", f"weights mode rejected: {reason}", None
            handle.graph = ext_graph
            if handle.mode == "session":
                self._write_host_files(handle)
            else:
                handle.group_key = _group_key(ext_graph, options, None if share else name)
                handle.new_group_bytes = lambda: self._new_group_bytes(handle.group_key)
            serve = options.get("host_session")
            handle.serve_on_host = handle.mode == "weights" if serve is None else bool(serve)
            if handle.serve_on_host:   # nearly free in weights mode: the weights are on the host anyway
                handle.host_session = candidate or self._host_session(handle)
            return handle
        except BaseException:
            self._release_impl(handle)
            raise

    def _host_session(self, handle: "OrtHandle") -> Any:
        if handle.mode == "session":
            return self._session(handle.name, handle.model_path(), None, 0, cpu=True, options=handle.options,
                                 optimized=handle.optimized_for_cpu)
        return self._session(handle.name, handle.graph, None, 0, cpu=True, options=handle.options,
                             weights_as_inputs=True)

    def _write_host_files(self, handle: "OrtHandle") -> None:
        """Session mode keeps its host tier as a model file and a weights file in RAM-backed storage
        (/dev/shm where it has room): ONNX Runtime maps external data from a file, the fastest way
        it creates a session. The host block goes back to the pool."""
        folder = tempfile.mkdtemp(prefix="model-", dir=self._host_files_dir(handle.weights_nbytes))
        try:
            with open(os.path.join(folder, "model.onnx"), "wb") as f:
                f.write(handle.graph)
            if handle.block is not None:
                with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
                    f.write(memoryview(handle.block.array)[:handle.weights_nbytes])
        except BaseException:
            import shutil
            shutil.rmtree(folder, ignore_errors=True)
            raise
        handle.host_dir = folder
        handle.host_in_ram = bool(self._shm) and folder.startswith(self._shm or "\0")
        handle.graph = b""
        if handle.block is not None:
            self.pool.put(handle.block)
            handle.block = None
        handle.host_bytes = handle.weights_nbytes if handle.host_in_ram else 0

    def _to_proto(self, name: str, value: Any) -> Tuple[Any, Optional[str]]:
        """The model as a ModelProto, and the folder its external data lives in (a path's: that
        data is read later, straight into the host block, not through the proto)."""
        onnx = _onnx()
        if type(value).__name__ == "InferenceSession":
            path, data = getattr(value, "_model_path", None), getattr(value, "_model_bytes", None)
            if not path and not data:
                raise UnsupportedModelError("the InferenceSession keeps neither its model path nor its bytes; "
                                            "return the path or bytes from the loader instead", model=name)
            value = path or data
        try:
            if isinstance(value, (str, os.PathLike)):
                path = os.fspath(value)
                if not os.path.exists(path):
                    raise InvalidModelError(f"no ONNX file at {path}", model=name)
                return onnx.load(path, load_external_data=False), os.path.dirname(os.path.abspath(path))
            if isinstance(value, (bytes, bytearray, memoryview)):
                return onnx.load_from_string(bytes(value)), None
            if type(value).__name__ == "ModelProto":
                copy = onnx.ModelProto()      # the weights are moved out: never touch the caller's proto
                copy.CopyFrom(value)
                return copy, None
        except InvalidModelError:
            raise
        except FileNotFoundError as exc:
            raise InvalidModelError(f"external data is missing: {exc}", model=name) from exc
        except Exception as exc:
            raise InvalidModelError(f"not a readable ONNX model: {type(exc).__name__}: {exc}", model=name) from exc
        raise UnsupportedModelError(f"the onnxruntime backend takes a .onnx path, bytes, a ModelProto or an "
                                    f"InferenceSession, not {type(value).__name__}", model=name)

    def _externalize(self, name: str, proto: Any, threshold: int, float_threshold: Optional[int] = None,
                     base_dir: Optional[str] = None) -> Tuple[bytes, List[Weight], Optional[HostBlock]]:
        """Move initializers >= threshold bytes (floating-point ones >= ``float_threshold``) into
        one host block; the graph refers to them as external data at their offsets in that block.
        Initializers in external-data files (under ``base_dir``) are read straight into the block;
        smaller ones that stay in the graph are loaded into it."""
        onnx = _onnx()
        from onnx import numpy_helper
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
        sized = []
        for init in proto.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL and base_dir is None:
                raise InvalidModelError(f"initializer {init.name!r} still refers to external data that "
                                        f"was not loaded", model=name)
            sized.append((init, _tensor_nbytes(init)))
        big = [(init, n) for init, n in sized if n >= threshold]
        if big and float_threshold is not None:   # a model with weights: its small float ones join them
            big = [(init, n) for init, n in sized
                   if n >= threshold or (init.data_type in floats and n >= float_threshold)]
        weights: List[Weight] = []
        offset = 0
        for init, nbytes in big:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            weights.append(Weight(init.name, np.dtype(dtype).str, tuple(int(d) for d in init.dims), offset, nbytes))
            offset = align(offset + nbytes)
        moved = {id(init) for init, _ in big}
        for init, _ in sized:     # external data that stays in the graph: into the proto
            if init.data_location == onnx.TensorProto.EXTERNAL and id(init) not in moved:
                _load_external(name, init, base_dir)
        block = self.pool.get(offset) if weights else None
        try:
            for (init, nbytes), w in zip(big, weights):
                assert block is not None
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    _read_external(name, init, base_dir, block.array[w.offset:w.offset + nbytes])
                else:
                    array = numpy_helper.to_array(init)
                    assert array.nbytes == nbytes
                    block.array[w.offset:w.offset + nbytes] = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
                init.ClearField("raw_data")
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                    init.ClearField(field)
                init.data_location = onnx.TensorProto.EXTERNAL
                del init.external_data[:]
                for key, val in (("location", WEIGHTS_FILE), ("offset", str(w.offset)), ("length", str(nbytes))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, val
            return proto.SerializeToString(), weights, block
        except BaseException:
            if block is not None:
                self.pool.put(block)
            raise

    def _verify(self, name: str, ext_graph: bytes, weights_graph: bytes, handle: "OrtHandle",
                options: Dict[str, Any]) -> Tuple[Optional[str], Any]:
        """Run the original and the weights-as-inputs graph on a sample input on the CPU. Returns
        (None, the rewritten graph's CPU session) if their outputs match, else (why not, None)."""
        reference = self._session(name, ext_graph, handle.block, handle.weights_nbytes, cpu=True, options=options)
        try:
            feed = _sample_feed(reference.get_inputs())
        except ValueError as exc:
            return str(exc), None
        try:
            candidate = self._session(name, weights_graph, None, 0, cpu=True, options=options,
                                      weights_as_inputs=True)
            model = OrtModel(name, candidate, handle.weights, None, handle.block, handle.input_names,
                             handle.output_names)
            got = model.run(None, feed)
        except Exception as exc:
            return f"the rewritten graph fails on ONNX Runtime ({type(exc).__name__}: {str(exc)[:300]})", None
        expected = reference.run(None, feed)
        rtol, atol = float(options.get("rtol", 1e-5)), float(options.get("atol", 1e-6))
        for out, a, b in zip(handle.output_names, expected, got):
            if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
                return f"output {out!r} differs from the original model's", None
        return None, candidate

    # sessions -----------------------------------------------------------------------------------
    def _providers(self, cpu: bool, options: Dict[str, Any]) -> List[Any]:
        if cpu or not self.on_gpu:
            return ["CPUExecutionProvider"]
        ort = _ort()
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:
                pass
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelCacheError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                                  f"(providers: {ort.get_available_providers()}); install onnxruntime-gpu")
        cuda = {"device_id": str(self.context.device), "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}
        cuda.update({k: str(v) for k, v in (options.get("provider_options") or {}).items()})
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]

    def _session(self, name: str, graph: bytes, block: Optional[HostBlock], nbytes: int, *, cpu: bool,
                 options: Dict[str, Any], weights_as_inputs: bool = False, optimized: bool = False,
                 save_optimized: Optional[str] = None) -> Any:
        """An InferenceSession of ``graph``; external weights come from ``block`` in memory."""
        ort = _ort()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        for key, val in (options.get("session_options") or {}).items():
            setattr(so, key, val)
        if optimized:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if not cpu and self.on_gpu and options.get("shared_arena", False) and self._shared_arena():
            so.add_session_config_entry("session.use_env_allocators", "1")
        if save_optimized:
            so.optimized_model_filepath = save_optimized
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        os.path.basename(save_optimized) + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                        str(int(options.get("weights_threshold", MiB))))
        source: Any = graph
        if block is not None and not weights_as_inputs:
            if hasattr(so, "add_external_initializers_from_files_in_memory"):
                so.add_external_initializers_from_files_in_memory([WEIGHTS_FILE], [block.array[:nbytes]], [nbytes])
            else:   # older onnxruntime: the weights go through a scratch file
                source = self._scratch_files(graph, block, nbytes)
        try:
            return ort.InferenceSession(source, sess_options=so, providers=self._providers(cpu, options))
        except ModelCacheError:
            raise
        except Exception as exc:
            raise InvalidModelError(f"ONNX Runtime rejected the model: {type(exc).__name__}: {str(exc)[:500]}",
                                    model=name) from exc

    # moves ----------------------------------------------------------------------------------------
    def _to_device_impl(self, handle: OrtHandle) -> None:
        if handle.mode == "weights":
            self._weights_to_device(handle)
            handle.device_bytes = handle.weights_nbytes     # plus the group's session if it carries it
        else:
            self._session_to_device(handle)
            handle.device_bytes = handle.weights_nbytes + handle.session_device_bytes

    def _weights_to_device(self, handle: OrtHandle) -> None:
        """Copy the weights into a device buffer, then join the handle's session group (creating
        its session on the first swap-in of that architecture)."""
        assert handle.block is not None
        nbytes = handle.weights_nbytes
        if self.on_gpu:
            stream = self.streams.get(self.context.device)
            with self._gate.read():         # allocations never overlap a measurement
                buffer = DeviceBuffer(nbytes, self.context.device, stream)
            try:
                stream.copy_to_device(buffer.ptr, handle.block.ptr, nbytes)
                stream.synchronize()
                device: Optional[Tuple[str, int]] = ("cuda", self.context.device)
                group = self._join_group(handle, device, buffer.ptr)
            except BaseException:
                with self._gate.read():
                    buffer.free(stream)
                raise
            handle.device_weights = buffer
            base: Any = buffer.ptr
            run_options = self._run_options(handle.options)
        else:
            allocation = self.context.monitor.allocate(nbytes, owner=handle.name)  # type: ignore[attr-defined]
            try:
                self.context.monitor.copy(nbytes)  # type: ignore[attr-defined]   # the simulated link's time
                group = self._join_group(handle, None, handle.block)
            except BaseException:
                allocation.free()
                raise
            handle.device_weights = allocation
            base, device, run_options = handle.block, None, None
        handle.wrapper = OrtModel(handle.name, group.session, handle.weights, device, base, handle.input_names,
                                  handle.output_names, run_options, group.runner, self._gate, handle.signature)

    # session groups -------------------------------------------------------------------------
    def _new_group_bytes(self, key: str) -> int:
        """Device bytes a swap-in adds by creating its group's session: 0 if the session exists,
        else the largest session measured so far (the simulated figure off the GPU)."""
        group = self._groups.get(key)
        if group is not None and group.session is not None:
            return 0
        return self._session_bytes_seen

    def _join_group(self, handle: OrtHandle, device: Optional[Tuple[str, int]], base: Any) -> _SessionGroup:
        """The handle's session group, its session created (and measured) if this is the group's
        first swap-in; concurrent swap-ins of one group create it once."""
        with self._groups_lock:
            group = handle.group or self._groups.get(handle.group_key)
            if group is None:
                group = self._groups[handle.group_key] = _SessionGroup(handle.group_key)
            group.pending += 1
        try:
            with group.lock:
                if group.session is None:
                    self._create_group_session(group, handle, device, base)
                with self._groups_lock:
                    if handle.group is not group:
                        group.members.append(handle)
                        handle.group = group
            return group
        finally:
            with self._groups_lock:
                group.pending -= 1
                self._drop_if_unused(group)

    def _create_group_session(self, group: _SessionGroup, handle: OrtHandle, device: Optional[Tuple[str, int]],
                              base: Any) -> None:
        """Create the group's session and run it once on ``handle``'s weights (so the run-time
        handles and workspaces exist); measure the device memory both took."""
        def create() -> Any:
            session = self._session(handle.name, handle.graph, None, 0, cpu=not self.on_gpu,
                                    options=handle.options, weights_as_inputs=True)
            group.warmup_error = None
            if handle.sample_inputs is not None:
                feed = {name: np.zeros(shape, dtype) for name, dtype, shape in handle.sample_inputs}
                try:   # the caller is the session's runner: the model runs here, not through it
                    OrtModel(handle.name, session, handle.weights, device, base, handle.input_names,
                             handle.output_names).run(None, feed)
                except Exception as exc:    # e.g. a symbolic dimension that 1 does not suit
                    group.warmup_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            return session

        if self.on_gpu:
            runner = _new_runner(handle.name)
            try:
                session, nbytes = self._measured(lambda: runner.submit(create).result())
            except BaseException:
                runner.shutdown(wait=False)
                raise
            group.session, group.runner, group.nbytes = session, runner, nbytes
        else:
            session_bytes = int(getattr(self.context.monitor, "session_overhead_bytes", 0))
            allocation = self.context.monitor.allocate(session_bytes, owner=handle.name)  # type: ignore[attr-defined]
            try:
                group.session = create()
            except BaseException:
                allocation.free()
                raise
            group.allocation, group.nbytes = allocation, session_bytes
        with self._groups_lock:
            self._session_bytes_seen = max(self._session_bytes_seen, group.nbytes)
            self._sessions_created += 1

    def _leave_group(self, handle: OrtHandle) -> None:
        """The handle stops using its group's session (unparked, demoted or released); the session
        goes with its last member. The next member in line carries its bytes."""
        with self._groups_lock:
            group, handle.group = handle.group, None
            if group is None:
                return
            if handle in group.members:
                group.members.remove(handle)
            self._drop_if_unused(group)

    def _drop_if_unused(self, group: _SessionGroup) -> None:
        """Groups lock held: forget a group nobody uses or joins, and free its session on its own
        thread (where ONNX Runtime keeps the thread's CUDA handles), then end that thread."""
        if group.members or group.pending or self._groups.get(group.key) is not group:
            return
        del self._groups[group.key]
        box = [group.session]
        group.session = None
        runner, group.runner = group.runner, None
        if group.allocation is not None:
            group.allocation.free()
            group.allocation = None
        if runner is not None:
            runner.submit(self._free_on_runner, box)
            runner.shutdown(wait=False)
        else:
            box.clear()

    def _free_on_runner(self, box: List[Any]) -> None:
        with self._gate.read():   # frees never overlap a measurement
            box.clear()

    def stats(self) -> Dict[str, Any]:
        with self._groups_lock:
            groups = list(self._groups.values())
            return {"sessions": sum(1 for g in groups if g.session is not None),
                    "sessions.bytes": sum(g.nbytes for g in groups if g.session is not None),
                    "sessions.created": self._sessions_created,
                    "sessions.models": sum(len(g.members) for g in groups)}

    def _session_to_device(self, handle: OrtHandle) -> None:
        """A session on the device from the host files; the first one saves an optimized graph
        that later ones load with optimizations off."""
        nbytes = handle.weights_nbytes
        allocation = None
        save = None if handle.optimized else os.path.join(handle.host_dir or "", "optimized.onnx")
        if not self.on_gpu:
            allocation = self.context.monitor.allocate(nbytes, owner=handle.name)  # type: ignore[attr-defined]
        try:
            create = lambda: self._session(handle.name, handle.model_path(), None, 0, cpu=not self.on_gpu,  # noqa: E731
                                           options=handle.options, optimized=handle.optimized,
                                           save_optimized=save)
            if self.on_gpu:
                runner = self._runner(handle)
                session, measured = self._measured(lambda: runner.submit(create).result())
                handle.session_device_bytes = max(0, measured - nbytes)
            else:
                session = create()
        except BaseException:
            if allocation is not None:
                allocation.free()
            raise
        finally:
            if save is not None:
                self._adopt_optimized(handle, save)
        handle.session, handle.device_weights = session, allocation
        handle.wrapper = OrtModel(handle.name, session, [], None, None, handle.input_names, handle.output_names,
                                  self._run_options(handle.options), self._runner(handle), self._gate)

    def _adopt_optimized(self, handle: OrtHandle, path: str) -> None:
        """Make the optimized graph the first device session saved the host files' model. Skipped
        (the plain graph kept, optimizations on) if it was not saved."""
        data_path = path + ".data"
        folder = handle.host_dir
        try:
            if folder is None or not os.path.exists(path):
                return
            onnx = _onnx()
            proto = onnx.load(path, load_external_data=False)
            location = os.path.basename(data_path)
            for init in proto.graph.initializer:
                for entry in init.external_data:
                    if entry.key == "location" and entry.value == location:
                        entry.value = WEIGHTS_FILE
            with open(os.path.join(folder, "model.onnx.new"), "wb") as f:
                f.write(proto.SerializeToString())
            if os.path.exists(data_path):
                os.replace(data_path, os.path.join(folder, WEIGHTS_FILE))
                handle.weights_nbytes = os.path.getsize(os.path.join(folder, WEIGHTS_FILE))
            os.replace(os.path.join(folder, "model.onnx.new"), handle.model_path())
            handle.optimized = True
            handle.optimized_for_cpu = not self.on_gpu
            handle.host_bytes = handle.weights_nbytes if handle.host_in_ram else 0
        except Exception:
            handle.optimized = False
        finally:
            remove_quietly(path)
            remove_quietly(data_path)

    def _shared_arena(self) -> bool:
        """One CUDA arena shared by every session of the process (registered once per device), so
        N cached models do not each keep an arena of their own. False if ONNX Runtime refuses."""
        device = self.context.device
        with _env_arenas_lock:
            if device in _env_arenas:
                return True
            ort = _ort()
            try:
                info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device, ort.OrtMemType.DEFAULT)
                cfg = ort.OrtArenaCfg({"max_mem": 0, "arena_extend_strategy": 1, "initial_chunk_size_bytes": -1,
                                       "max_dead_bytes_per_chunk": -1})
                ort.create_and_register_allocator(info, cfg)
            except Exception:
                return False
            _env_arenas.add(device)
            return True

    def _run_options(self, options: Dict[str, Any]) -> Any:
        """With ``shrink_arena`` (default False; no effect measured on the H100), arenas on a GPU
        give back what a run allocated once it ends."""
        if not self.on_gpu or not options.get("shrink_arena", False):
            return None
        ort = _ort()
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{self.context.device}")
        return run_options

    def _runner(self, handle: "OrtHandle") -> Any:
        """Session mode: the model's own thread for its sessions (see :func:`_new_runner`). None
        off the GPU."""
        if not self.on_gpu:
            return None
        if handle.runner is None:
            handle.runner = _new_runner(handle.name)
        return handle.runner

    def _measured(self, create: Any) -> Tuple[Any, int]:
        """Run ``create()`` and return its result with this process's device-memory growth (NVML).
        This backend's own allocations and frees wait meanwhile, so they do not skew the figure."""
        monitor = self.context.monitor
        with self._gate.write():
            before = monitor.process_bytes() or 0
            result = create()
            after = monitor.process_bytes() or 0
        return result, max(0, after - before)

    def _to_host_impl(self, handle: OrtHandle) -> None:
        if handle.wrapper is not None:
            handle.wrapper.retire()
            handle.wrapper = None
        if handle.mode == "session":
            handle.session = None              # the last reference: its device memory goes now
        if isinstance(handle.device_weights, DeviceBuffer):
            with self._gate.read():   # no lease, so no run uses the weights: free in this thread's stream order
                handle.device_weights.free(self.streams.get(self.context.device))
        elif handle.device_weights is not None:
            handle.device_weights.free()
        handle.device_weights = None
        handle.host_bytes = handle.block.nbytes if handle.block is not None else 0

    def _to_disk_impl(self, handle: OrtHandle, directory: str) -> None:
        graph_path = model_file(directory, handle.name, ".onnx")
        weights_path = model_file(directory, handle.name, ".weights")
        if handle.mode == "session":
            graph = open(handle.model_path(), "rb").read()
            weights: Any = _file_chunks(os.path.join(handle.host_dir or "", WEIGHTS_FILE))
        else:
            graph = handle.graph
            weights = memoryview(handle.block.array)[:handle.weights_nbytes] if handle.block is not None else None
        files = {"graph": (graph_path, atomic_write(graph_path, graph))}
        try:
            if handle.weights_nbytes:
                files["weights"] = (weights_path, atomic_write(weights_path, weights))
        except BaseException:
            remove_quietly(graph_path)
            raise
        handle.files, handle.disk_path = files, graph_path
        self._drop_host_session(handle)
        handle.session = None      # below the host tier nothing stays on the device (re-created on return)
        self._leave_group(handle)
        handle.graph = b""
        if handle.block is not None:
            self.pool.put(handle.block)
            handle.block = None
        self._remove_host_files(handle)

    def _from_disk_impl(self, handle: OrtHandle) -> None:
        graph_path, graph_sha = handle.files["graph"]
        graph = read_verified(graph_path, graph_sha, model=handle.name)
        block = None
        if "weights" in handle.files:
            path, sha = handle.files["weights"]
            block = self.pool.get(handle.weights_nbytes)
            try:
                _read_into(path, block, handle.weights_nbytes, sha, handle.name)
            except BaseException:
                self.pool.put(block)
                raise
        handle.graph, handle.block = graph, block
        handle.host_bytes = block.nbytes if block is not None else 0
        if handle.mode == "session":
            self._write_host_files(handle)
        for path, _ in handle.files.values():
            remove_quietly(path)
        handle.files, handle.disk_path = {}, None
        if handle.serve_on_host:
            try:
                handle.host_session = self._host_session(handle)
            except ModelCacheError:   # e.g. a graph optimized for CUDA that the CPU cannot load
                handle.host_session = None

    def _remove_host_files(self, handle: OrtHandle) -> None:
        if handle.host_dir is not None:
            import shutil
            shutil.rmtree(handle.host_dir, ignore_errors=True)
            handle.host_dir = None

    def _unpark_impl(self, handle: OrtHandle) -> None:
        """Leave the session group kept on the device for fast swap-ins (its session goes with its
        last member); the next swap-in joins or creates it again."""
        if handle.wrapper is not None:
            handle.wrapper.retire()
            handle.wrapper = None
        self._leave_group(handle)

    def _drop_host_session(self, handle: OrtHandle) -> None:
        if handle.host_wrapper is not None:
            handle.host_wrapper.retire()
        handle.host_session = handle.host_wrapper = None

    def _release_impl(self, handle: OrtHandle) -> None:
        try:
            if handle.wrapper is not None:
                handle.wrapper.retire()
            if handle.device_weights is not None:
                handle.device_weights.free()
            handle.device_weights = None
            handle.session = handle.wrapper = None
            self._leave_group(handle)
            self._drop_host_session(handle)
            if handle.block is not None:
                self.pool.put(handle.block)
                handle.block = None
            for path, _ in handle.files.values():
                remove_quietly(path)
            handle.files = {}
            self._remove_host_files(handle)
            if handle.runner is not None:
                handle.runner.shutdown(wait=False)
                handle.runner = None
        except Exception:  # release must not raise
            pass

    def _model_impl(self, handle: OrtHandle) -> OrtModel:
        assert handle.wrapper is not None
        return handle.wrapper

    def host_model(self, handle: OrtHandle) -> Optional[OrtModel]:
        """A model that serves from host memory (CPU provider) while this one is off the device."""
        if handle.host_session is None:
            return None
        if handle.host_wrapper is None:
            weights = handle.weights if handle.mode == "weights" else []
            handle.host_wrapper = OrtModel(handle.name, handle.host_session, weights, None, handle.block,
                                           handle.input_names, handle.output_names,
                                           signature=handle.signature if handle.mode == "weights" else None)
        return handle.host_wrapper

    def close(self) -> None:
        self.streams.close()
        self.pool.close()
        import shutil
        for folder in (self._scratch, self._shm):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    def _scratch_files(self, graph: bytes, block: HostBlock, nbytes: int) -> str:
        folder = tempfile.mkdtemp(dir=self._scratch_dir())
        with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
            f.write(memoryview(block.array)[:nbytes])
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(graph)
        return path

    def _host_files_dir(self, nbytes: int) -> str:
        """/dev/shm (RAM) when it has room for twice ``nbytes``, else the scratch folder."""
        import shutil
        with self._scratch_lock:
            if self._shm is None:
                try:
                    self._shm = tempfile.mkdtemp(prefix="modelcache-ort-", dir="/dev/shm")
                except OSError:
                    self._shm = ""
            shm = self._shm
        if shm and shutil.disk_usage(shm).free >= 2 * nbytes + 64 * MiB:
            return shm
        return self._scratch_dir()

    def _scratch_dir(self) -> str:
        with self._scratch_lock:
            if self._scratch is None:
                base = self.context.disk_dir
                self._scratch = tempfile.mkdtemp(prefix="modelcache-ort-", dir=base)
            return self._scratch


# helpers -------------------------------------------------------------------------------------------
def _new_runner(label: str) -> Any:
    """A session's own thread. ONNX Runtime's CUDA provider keeps device memory (cuBLAS/cuDNN
    handles, workspaces) for every thread that runs a session or binds inputs to it; creating,
    binding and running a session on one thread keeps that to one per session, the figure
    measured when the session is made."""
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"modelcache-ort-{label}"[:40])


class _Gate:
    """A readers/writer lock preferring the writer: any number of runs and allocations at once, or
    one memory measurement alone (waiting readers let a waiting measurement go first)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Any:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Any:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def _external_entry(name: str, init: Any, base_dir: Optional[str]) -> Tuple[str, int, Optional[int]]:
    """(file path, offset, length) of an initializer's external data, checked to lie in base_dir."""
    info = {e.key: e.value for e in init.external_data}
    location = info.get("location", "")
    root = os.path.realpath(base_dir or ".")
    path = os.path.realpath(os.path.join(root, location))
    if not location or os.path.isabs(location) or not (path == root or path.startswith(root + os.sep)):
        raise InvalidModelError(f"initializer {init.name!r}: external data location {location!r} is not a "
                                f"file beside the model", model=name)
    if not os.path.isfile(path):
        raise InvalidModelError(f"external data is missing: initializer {init.name!r} refers to {path}, "
                                f"which does not exist", model=name)
    length = info.get("length")
    return path, int(info.get("offset", 0) or 0), int(length) if length else None


def _read_external(name: str, init: Any, base_dir: Optional[str], out: np.ndarray) -> None:
    """Read an initializer's external data straight into ``out`` (uint8, its exact size)."""
    path, offset, length = _external_entry(name, init, base_dir)
    if length is not None and length != out.nbytes:
        raise InvalidModelError(f"initializer {init.name!r}: external data length {length} B, but its shape "
                                f"and type need {out.nbytes} B", model=name)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            got = read_into(f, memoryview(out))
    except OSError as exc:
        raise InvalidModelError(f"initializer {init.name!r}: cannot read {path}: {exc}", model=name) from exc
    if got != out.nbytes:
        raise InvalidModelError(f"initializer {init.name!r}: {path} ends after {got} of {out.nbytes} B "
                                f"(offset {offset})", model=name)


def _load_external(name: str, init: Any, base_dir: Optional[str]) -> None:
    """Load a (small) initializer's external data into the proto itself."""
    onnx = _onnx()
    nbytes = _tensor_nbytes(init)
    data = np.empty(nbytes, dtype=np.uint8)
    _read_external(name, init, base_dir, data)
    init.raw_data = data.tobytes()
    init.data_location = onnx.TensorProto.DEFAULT
    del init.external_data[:]


def _looks_like_onnx(head: bytes) -> bool:
    """ModelProto starts with field 1 (ir_version, varint) in practice: byte 0x08."""
    return len(head) > 2 and head[0] == 0x08


def _tensor_nbytes(init: Any) -> int:
    onnx = _onnx()
    if init.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    count = int(np.prod(init.dims)) if len(init.dims) else 1
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return count * itemsize


def _as_inputs(proto: Any, weights: Sequence[Weight], generic: bool = False) -> bytes:
    """The graph with the given initializers turned into graph inputs. With ``generic``, also
    without what differs between models of one architecture: every dimension of the graph's
    inputs and outputs becomes symbolic, and the graph's name, doc strings and intermediate
    shapes go, so such models serialize to the same bytes and can share one session."""
    onnx = _onnx()
    names = {w.name for w in weights}
    kept = [init for init in proto.graph.initializer if init.name not in names]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    existing = {i.name for i in proto.graph.input}
    for w in weights:
        if w.name in existing:       # an overridable initializer already listed as an input
            continue
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(w.dtype))
        proto.graph.input.append(onnx.helper.make_tensor_value_info(w.name, elem, list(w.shape)))
    if generic:
        graph = proto.graph
        for value in list(graph.input) + list(graph.output):
            value.doc_string = ""
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                    dim.Clear()
                    dim.dim_param = f"{value.name}:{axis}"
        del graph.value_info[:]
        graph.name, graph.doc_string, proto.doc_string = "modelcache", "", ""
        for node in graph.node:
            node.doc_string = ""
    return proto.SerializeToString()


def _group_key(graph: bytes, options: Dict[str, Any], name: Optional[str]) -> str:
    """Models with the same key can share a session: same rewritten graph, same session options
    (``name`` set: a group of its own)."""
    import hashlib
    import json
    digest = hashlib.sha256(graph)
    settings = {k: options.get(k) for k in ("provider_options", "session_options", "shared_arena")}
    digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    if name is not None:
        digest.update(b"\0" + name.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ValueInfo:
    """An input or output as ``InferenceSession.get_inputs()`` describes it: ``type`` like
    ``"tensor(float)"``, ``shape`` with ints, names of symbolic dimensions, or None."""

    name: str
    type: str
    shape: List[Any]


def _signature(proto: Any, input_names: Sequence[str]) -> Tuple[List[ValueInfo], List[ValueInfo]]:
    onnx = _onnx()
    wanted = set(input_names)

    def info(value: Any) -> ValueInfo:
        tensor = value.type.tensor_type
        try:
            kind = onnx.helper.tensor_dtype_to_string(tensor.elem_type).split(".")[-1].lower()
        except Exception:
            kind = "undefined"
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        return ValueInfo(value.name, f"tensor({kind})", shape)

    return ([info(v) for v in proto.graph.input if v.name in wanted], [info(v) for v in proto.graph.output])


def _sample_specs(proto: Any, names: Sequence[str]) -> Optional[List[Tuple[str, Any, List[int]]]]:
    """(name, dtype, shape) of each input for a warm-up run (symbolic dimensions become 1), or
    None if an input's type cannot be sampled."""
    onnx = _onnx()
    wanted = set(names)
    specs = []
    for value in proto.graph.input:
        if value.name not in wanted:
            continue
        tensor = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except Exception:
            return None
        if dtype.kind not in "fiub":
            return None
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor.shape.dim]
        specs.append((value.name, dtype, shape))
    return specs


_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _sample_feed(inputs: Sequence[Any], seed: int = 0) -> Dict[str, np.ndarray]:
    """A deterministic sample input for each graph input (symbolic dimensions become 1)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i in inputs:
        dtype = _ORT_DTYPES.get(i.type)
        if dtype is None:
            raise ValueError(f"input {i.name!r} of type {i.type} cannot be sampled")
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (i.shape or [])]
        if np.issubdtype(dtype, np.floating):
            feed[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feed[i.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feed[i.name] = rng.integers(0, 2, shape).astype(dtype)
    return feed


def _file_chunks(path: str, chunk: int = 64 * MiB):
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                return
            yield data


def _read_into(path: str, block: HostBlock, nbytes: int, sha256: str, name: str) -> None:
    """Read ``path`` straight into the (pinned) block, checking size and sha256."""
    import hashlib
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            got = read_into(f, memoryview(block.array)[:nbytes], digest)
            extra = f.read(1)
    except OSError as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}", model=name) from exc
    if got != nbytes or extra:
        raise CorruptFileError(f"{path} has the wrong size (expected {nbytes} B)", model=name)
    if digest.hexdigest() != sha256:
        raise CorruptFileError(f"{path} fails its sha256 check: the file was changed", model=name)

