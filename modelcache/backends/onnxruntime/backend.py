"""The "onnxruntime" backend: ONNX models moved between the device, host RAM and disk.

Loader results: a path to an ``.onnx`` file (external data beside it is read too), model bytes,
an ``onnx.ModelProto``, or an ``onnxruntime.InferenceSession`` (its model path or bytes are
reused). At load, initializers of at least ``weights_threshold`` bytes (default 1 MiB) are moved
out of the graph into one host block (pinned on a GPU machine); then the model runs in one of two
swap modes:

``mode="weights"`` (``weights_mode.py``; the default where it is correct)
    One long-lived session per architecture takes the weights as inputs; a swap-in copies the
    weights into a device buffer at PCIe speed, with no session creation.

``mode="session"`` (``session_mode.py``)
    The device tier is a session on the device created from files in RAM; the first one saves an
    optimized graph that later ones load with optimizations off.

Weights mode is prepared at the model's first swap-in, on the device it will run on
(``optimize.py``): ONNX Runtime optimizes the graph for that device with the weights as
constants, the optimized graph's weights are lifted to inputs, and the lifted graph's outputs are
compared with the plain session's there. ``mode="auto"`` keeps weights mode when they match
within a tolerance scaled to the outputs and to ONNX Runtime's own deviation, and falls back to
session mode otherwise; ``info().details`` says which mode a model runs in, why, and the measured
deviation. Weights stored as ``Constant`` nodes count as weights. With ``host_session=True``, a
CPU session serves the model while it is parked on the host (``use(..., allow_host=True)``).

On a simulated device, "device" sessions use the CPU provider and device buffers are host
memory booked on the simulated device: the code path is the same as on a GPU.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Optional, Tuple

from ..._fileio import atomic_write, model_file, read_into, read_verified, remove_quietly
from ...devices.host import HostBlock
from ...errors import ConfigError, CorruptFileError, ModelCacheError
from ..base import Backend, BackendContext
from . import graph
from .graph import MiB
from .handle import Mode, OrtHandle
from .model import OrtModel
from .session_mode import SessionMode
from .sessions import Sessions
from .weights_mode import WeightsMode

_OPTIONS = {"mode", "weights_threshold", "host_session", "verify", "optimize", "sample_input", "provider_options",
            "session_options", "rtol", "atol", "size_hint", "shared_arena", "shrink_arena", "share_session",
            "share_threshold", "share_sizes", "caller_threads"}


class OnnxRuntimeBackend(Backend):
    """ONNX models; see the module docstring."""

    name = "onnxruntime"

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.memory = context.memory
        self.pool = self.memory.new_host_pool()
        self.sessions = Sessions(self.memory, context.disk_dir)
        self.modes: Dict[str, Mode] = {"weights": WeightsMode(self), "session": SessionMode(self)}

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
        return isinstance(value, (bytes, bytearray)) and graph.looks_like_onnx(bytes(value[:64]))

    # load: normalise, externalise the weights, choose the mode ----------------------------
    def _load_impl(self, name: str, value: Any, options: Dict[str, Any]) -> OrtHandle:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigError(f"unknown onnxruntime option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}",
                              model=name)
        mode = options.get("mode", "auto")
        if mode not in ("auto", "weights", "session"):
            raise ConfigError(f"mode={mode!r}; use 'auto', 'weights' or 'session'", model=name)
        callers = options.get("caller_threads", 0)
        if type(callers) is not int or callers < 0:
            raise ConfigError(f"caller_threads={callers!r}; use an int >= 0 (threads per architecture that run "
                              f"its models themselves)", model=name)
        threshold = int(options.get("weights_threshold", MiB))
        proto, base_dir = graph.to_proto(name, value)
        handle = OrtHandle(name)
        handle.options = dict(options)
        initializers = {i.name for i in proto.graph.initializer}
        handle.input_names = [i.name for i in proto.graph.input if i.name not in initializers]
        handle.output_names = [o.name for o in proto.graph.output]
        handle.sample_inputs = graph.sample_specs(proto, handle.input_names)
        handle.signature = graph.signature(proto, handle.input_names)
        share = bool(options.get("share_session", True))
        try:
            # to share a session, models must not differ in constants: floating-point initializers
            # from share_threshold bytes up (biases, norms) become inputs too; small integer ones
            # (shapes, axes) stay in the graph and must match
            small = int(options.get("share_threshold", graph.SHARE_THRESHOLD)) if share and mode != "session" else None
            graph.constants_to_initializers(proto, min(threshold, small if small is not None else threshold))
            ext_graph, weights, block = graph.externalize(name, proto, threshold, self.pool.get, self.pool.put,
                                                          small, base_dir)
            del proto
            handle.weights, handle.block = weights, block
            # the span the weights use in the block: offsets are aligned, so this is more than the
            # sum of their sizes; files, copies and device buffers all take the whole span
            handle.weights_nbytes = weights[-1].offset + weights[-1].nbytes if weights else 0
            handle.host_bytes = block.nbytes if block is not None else 0
            handle.graph, _, handle.ops, handle.mode_reason = self._choose_mode(
                name, mode, ext_graph, handle, options, share)
            handle.ops.prepare(handle)
            serve = options.get("host_session")
            handle.serve_on_host = handle.mode == "weights" if serve is None else bool(serve)
            self.refresh_host_session(handle)
            return handle
        except BaseException:
            self._release_impl(handle)
            raise

    def _choose_mode(self, name: str, mode: str, ext_graph: bytes, handle: OrtHandle, options: Dict[str, Any],
                     share: bool) -> Tuple[bytes, Any, Mode, str]:
        """(graph, None, the mode, why). Weights mode is prepared and checked at the first swap-in."""
        if mode == "session" or not handle.weights:
            return ext_graph, None, self.modes["session"], (
                "requested" if mode == "session" else "no initializer above the threshold")
        others = [f"{v.name}: {v.type}" for v in (handle.signature[0] + handle.signature[1] if handle.signature else [])
                  if not v.type.startswith("tensor(")]
        if others:   # weights mode binds each run's inputs and outputs, and ONNX Runtime binds tensors only
            return ext_graph, None, self.modes["session"], f"inputs or outputs that are not tensors ({', '.join(others)})"
        return ext_graph, None, self.modes["weights"], "not checked yet: checked on the device at the first swap-in"

    def switch_to_session_mode(self, handle: OrtHandle, reason: str) -> None:
        """A weights-mode model whose check failed (its original graph and weights restored) moves
        to the device in session mode instead."""
        self._drop_host_session(handle)
        handle.ops, handle.mode_reason = self.modes["session"], reason
        handle.ops.prepare(handle)
        self.refresh_host_session(handle)
        handle.ops.to_device(handle)

    def refresh_host_session(self, handle: OrtHandle) -> None:
        """(Re)create the CPU session that serves from the host, where one is wanted; where the
        CPU cannot run the model's graph (e.g. one optimized for CUDA), there is none and
        ``details["host_session_error"]`` says why."""
        self._drop_host_session(handle)
        handle.check.pop("host_session_error", None)
        if not handle.serve_on_host:
            return
        try:
            handle.host_session = handle.ops.host_session(handle)
        except ModelCacheError as exc:
            handle.check["host_session_error"] = exc.reason[:300]

    # moves ----------------------------------------------------------------------------------------
    def _to_device_impl(self, handle: OrtHandle) -> None:
        handle.ops.to_device(handle)

    def _to_host_impl(self, handle: OrtHandle) -> None:
        self._retire(handle)
        handle.ops.to_host(handle)
        handle.host_bytes = handle.block.nbytes if handle.block is not None else handle.host_bytes

    def _unpark_impl(self, handle: OrtHandle) -> None:
        self._retire(handle)
        handle.ops.unpark(handle)

    def _to_disk_impl(self, handle: OrtHandle, directory: str) -> None:
        graph_path = model_file(directory, handle.name, ".onnx")
        weights_path = model_file(directory, handle.name, ".weights")
        graph_bytes, weights = handle.ops.disk_payload(handle)
        files = {"graph": (graph_path, atomic_write(graph_path, graph_bytes))}
        try:
            if handle.weights_nbytes:
                assert weights is not None
                files["weights"] = (weights_path, atomic_write(weights_path, weights))
        except BaseException:
            remove_quietly(graph_path)
            raise
        handle.files, handle.disk_path = files, graph_path
        self._drop_host_session(handle)
        handle.ops.leave_host(handle)
        handle.graph = b""
        self._put_block(handle)

    def _from_disk_impl(self, handle: OrtHandle) -> None:
        graph_path, graph_sha = handle.files["graph"]
        graph_bytes = read_verified(graph_path, graph_sha, model=handle.name)
        block = None
        if "weights" in handle.files:
            path, sha = handle.files["weights"]
            block = self.pool.get(handle.weights_nbytes)
            try:
                _read_checked(path, block, handle.weights_nbytes, sha, handle.name)
            except BaseException:
                self.pool.put(block)
                raise
        handle.graph, handle.block = graph_bytes, block
        handle.host_bytes = block.nbytes if block is not None else 0
        handle.ops.from_disk(handle)
        for path, _ in handle.files.values():
            remove_quietly(path)
        handle.files, handle.disk_path = {}, None
        self.refresh_host_session(handle)

    def _release_impl(self, handle: OrtHandle) -> None:
        try:
            self._retire(handle)
            if handle.ops is not None:
                handle.ops.release(handle)
            self._drop_host_session(handle)
            self._put_block(handle)
            for path, _ in handle.files.values():
                remove_quietly(path)
            handle.files = {}
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
            handle.host_wrapper = handle.ops.host_model(handle)
        return handle.host_wrapper

    def _weights_mode(self) -> WeightsMode:
        mode = self.modes["weights"]
        assert isinstance(mode, WeightsMode)
        return mode

    def reclaimable_device_bytes(self) -> int:
        return self._weights_mode().reclaimable_bytes()

    def reclaim_device_bytes(self) -> None:
        self._weights_mode().reclaim()

    def soft_device_bytes(self) -> int:
        return self._weights_mode().soft_bytes()

    def stats(self) -> Dict[str, Any]:
        return self._weights_mode().stats()

    def close(self) -> None:
        self.pool.close()
        self.sessions.close()

    def remove_files(self) -> None:
        self.sessions.close()

    # helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _retire(handle: OrtHandle) -> None:
        """The model object handed out stops working (its lease is over and the model moves)."""
        if handle.wrapper is not None:
            handle.wrapper.retire()
            handle.wrapper = None

    @staticmethod
    def _drop_host_session(handle: OrtHandle) -> None:
        if handle.host_wrapper is not None:
            handle.host_wrapper.retire()
        handle.host_session = handle.host_wrapper = None

    def _put_block(self, handle: OrtHandle) -> None:
        if handle.block is not None:
            self.pool.put(handle.block)
            handle.block = None


def _read_checked(path: str, block: HostBlock, nbytes: int, sha256: str, name: str) -> None:
    """Read ``path`` straight into the (pinned) block, checking size and sha256."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            got = read_into(f, block.array.data[:nbytes], digest)
            extra = f.read(1)
    except OSError as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}", model=name) from exc
    if got != nbytes or extra:
        raise CorruptFileError(f"{path} has the wrong size (expected {nbytes} B)", model=name)
    if digest.hexdigest() != sha256:
        raise CorruptFileError(f"{path} fails its sha256 check: the file was changed", model=name)
