"""Preparing a model for weights mode at its first swap-in, on the device it will run on.

1. ONNX Runtime creates the plain session a user would create (the model with its weights as
   constants, on the device's provider, default optimizations) and saves the graph it optimized
   for that provider: BatchNormalization folded into convolutions, attention, LayerNorm and GELU
   fused, layouts chosen. That session's outputs on a sample input are the reference.
2. The optimized graph's weights (folded and fused ones included) move into a new host block and
   become graph inputs (``graph.as_inputs``): the graph the model's shared session runs. On the
   CPU provider, matrix-multiplication weights are stored transposed (``graph.transpose_matmul_weights``).
3. The lifted graph runs on the same device with the model's weights copied to the device (this
   is the swap-in itself) and its outputs are compared with the reference. The tolerance scales
   with the outputs' magnitude and with how far ONNX Runtime's own ways of running the model
   differ from each other (the reference against a literal, unoptimized CPU session), so fused
   kernels and TF32 do not cause false rejections while a rewrite that changes results does.

The cache reserves room for all of it (:func:`first_swap_in_bytes`), so the check stays within
the device budget. ``info().details`` records the deviation, the tolerance and what they came from.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np

from ...devices.host import HostBlock
from . import graph
from .graph import Weight
from .model import OrtModel

if TYPE_CHECKING:  # pragma: no cover
    from .backend import OnnxRuntimeBackend
    from .handle import OrtHandle


@dataclass
class Reference:
    """The plain session's outputs on a sample input, and the optimized graph it saved."""

    feed: Dict[str, np.ndarray]
    outputs: List[np.ndarray]
    optimized_path: Optional[str]       # None: ONNX Runtime did not save one
    folder: str
    literal_deviation: Optional[float] = None   # reference vs an unoptimized CPU session


@dataclass
class Lifted:
    """The graph with its weights as inputs, and those weights in a host block."""

    graph: bytes
    weights: List[Weight]
    block: Optional[HostBlock]
    weights_nbytes: int
    optimized: bool
    notes: Dict[str, Any] = field(default_factory=dict)


def first_swap_in_bytes(weights_nbytes: int, session_bytes: int) -> int:
    """Device bytes the first swap-in holds at once: the plain reference session (the weights and
    a session) while it runs; it is gone before the weights' buffer and the shared session come."""
    return weights_nbytes + session_bytes


def reference(backend: "OnnxRuntimeBackend", handle: "OrtHandle", save: bool) -> Reference:
    """Step 1, on the device: the plain session's outputs, and the optimized graph it saved."""
    memory, sessions = backend.memory, backend.sessions
    folder = tempfile.mkdtemp(prefix="optimize-", dir=sessions.scratch_dir())
    path = os.path.join(folder, "optimized.onnx") if save else None
    small = _share_threshold(handle.options)
    runner = memory.new_runner(f"ort-check-{handle.name}")
    try:
        def create() -> Any:
            return sessions.create(handle.name, handle.graph, handle.block, handle.weights_nbytes, cpu=False,
                                   options=handle.options, save_optimized=path,
                                   save_min_bytes=small if small is not None else None)

        with sessions.gate.write():    # its first run searches convolution algorithms: a workspace spike
            session, charge = memory.measure(lambda: runner.call(create),
                                             expected_bytes=handle.weights_nbytes + memory.session_overhead_bytes,
                                             owner=handle.name)
            try:
                feed, outputs = runner.call(_sample_run, session, handle.options.get("sample_input"))
            finally:
                del session            # its device memory goes before the model's own buffer is made
                charge.free()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        runner.shutdown()
    saved = path if path is not None and os.path.exists(path) else None
    return Reference(feed, outputs, saved, folder)


def literal_deviation(backend: "OnnxRuntimeBackend", handle: "OrtHandle", ref: Reference) -> float:
    """How far the reference is from the model evaluated literally (CPU provider, ONNX Runtime's
    optimizations off): the noise floor of running this model at all."""
    session = backend.sessions.create(handle.name, handle.graph, handle.block, handle.weights_nbytes, cpu=True,
                                      options=handle.options, optimized=True)
    return _max_deviation(ref.outputs, session.run(None, ref.feed))


def lift(backend: "OnnxRuntimeBackend", handle: "OrtHandle", ref: Optional[Reference], share: bool) -> Lifted:
    """Step 2: the optimized graph (or, without one, the original) with its weights as inputs;
    the weights in a new host block (the original block stays with the handle)."""
    onnx = graph.onnx_module()
    threshold = int(handle.options.get("weights_threshold", graph.MiB))
    small = _share_threshold(handle.options) if share else None
    notes: Dict[str, Any] = {}
    if ref is not None and ref.optimized_path is not None:
        block: Optional[HostBlock] = None
        try:
            proto = onnx.load(ref.optimized_path, load_external_data=False)
            ext, weights, block = graph.externalize(handle.name, proto, threshold, backend.pool.get,
                                                    backend.pool.put, small, ref.folder, has_weights=True)
            nbytes = weights[-1].offset + weights[-1].nbytes if weights else 0
            any_size = share and bool(handle.options.get("share_sizes", False))
            if weights:
                proto = onnx.load_from_string(ext)
                if block is not None and backend.sessions.device.transposed_matmul_weights:
                    weights, notes["transposed_weights"] = graph.transpose_matmul_weights(proto, weights, block)
                lifted = graph.as_inputs(proto, weights, generic=share, any_size=any_size)
                return Lifted(lifted, weights, block, nbytes, True, notes)
            notes["optimized_graph_unused"] = "the optimized graph has no weights above the threshold"
        except Exception as exc:     # keep the original graph: the rewrite of it is checked the same way
            if block is not None:    # the optimized graph's weights are not needed
                backend.pool.put(block)
            notes.pop("transposed_weights", None)
            notes["optimized_graph_unused"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    lifted = graph.as_inputs(onnx.load_from_string(handle.graph), handle.weights, generic=share,
                             any_size=share and bool(handle.options.get("share_sizes", False)))
    return Lifted(lifted, list(handle.weights), None, handle.weights_nbytes, False, notes)


def compare(ref: Reference, got: List[np.ndarray], output_names: List[str], options: Dict[str, Any],
            on: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """Step 3's verdict: (None, the figures) if ``got`` matches the reference within the
    tolerance, else (why not, the figures)."""
    rtol, atol = float(options.get("rtol", 1e-4)), float(options.get("atol", 1e-6))
    scale = max((float(np.max(np.abs(a))) for a in ref.outputs if a.size and a.dtype.kind in "fc"), default=0.0)
    noise = ref.literal_deviation or 0.0
    tolerance = max(2.0 * noise, rtol * scale) + atol
    figures: Dict[str, Any] = {"verified_on": on, "output_scale": scale, "provider_deviation": noise,
                               "tolerance": tolerance}
    for out, a, b in zip(output_names, ref.outputs, got):
        if a.shape != b.shape:
            return f"output {out!r} has shape {list(b.shape)}, the plain session's {list(a.shape)}", figures
    deviation = _max_deviation(ref.outputs, got)
    figures["deviation"] = deviation
    if not deviation <= tolerance:     # NaN fails too
        return (f"output differs from the plain session's on {on} by {deviation:.3g}, more than the tolerance "
                f"{tolerance:.3g} (output scale {scale:.3g}, provider deviation {noise:.3g})"), figures
    return None, figures


def candidate_outputs(backend: "OnnxRuntimeBackend", handle: "OrtHandle", lifted: Lifted, session: Any,
                      buffer_ptr: int, runner: Any, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
    """The lifted graph's outputs on the device, its weights read from ``buffer_ptr``."""
    memory = backend.memory
    model = OrtModel(handle.name, session, lifted.weights, (memory.kind, memory.index), buffer_ptr,
                     handle.input_names, handle.output_names)
    outputs: List[np.ndarray] = runner.call(model.run, None, feed)
    return outputs


def cleanup(ref: Optional[Reference]) -> None:
    if ref is not None:
        shutil.rmtree(ref.folder, ignore_errors=True)


def _sample_run(session: Any, given: Optional[Dict[str, Any]]) -> Tuple[Dict[str, np.ndarray], List[np.ndarray]]:
    """Run ``session`` on ``given`` or on a sample input: symbolic dimensions 8 (then 1, if the
    model refuses 8)."""
    if given is not None:
        feed = {k: np.ascontiguousarray(v) for k, v in given.items()}
        return feed, session.run(None, feed)
    error: Optional[Exception] = None
    for symbolic in (8, 1):
        feed = graph.sample_feed(session.get_inputs(), symbolic=symbolic)
        try:
            return feed, session.run(None, feed)
        except Exception as exc:
            error = exc
    raise ValueError(f"the model does not run on a sample input: {error}")


def _max_deviation(expected: List[np.ndarray], got: List[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(expected, got):
        if a.size:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            worst = max(worst, float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan"))
            if np.isnan(diff).any() and not (np.isnan(a) == np.isnan(b)).all():
                return float("inf")
    return worst


def _share_threshold(options: Dict[str, Any]) -> Optional[int]:
    return int(options.get("share_threshold", graph.SHARE_THRESHOLD)) if options.get("share_session", True) else None
