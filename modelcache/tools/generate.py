"""Generated ONNX models (MLPs) for tests, benchmarks, the demo and stress runs. Needs ``onnx``."""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np


def make_mlp(hidden: int = 64, layers: int = 2, *, seed: int = 0, bias: bool = True, batch: Optional[int] = None,
             opset: int = 17) -> Any:
    """An MLP ``y = relu(... relu(x @ W1 + b1) ...) @ Wn + bn`` as an ``onnx.ModelProto``.

    Weights are float32, ``hidden`` x ``hidden`` each (4 * hidden**2 bytes a layer), scaled so
    outputs stay finite. The input ``x`` is ``[batch, hidden]`` (``batch`` None: symbolic).
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for i in range(layers):
        w = (rng.standard_normal((hidden, hidden), dtype=np.float32) / math.sqrt(hidden)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [out + "_mm" if bias else out]))
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, f"b{i}"))
            nodes.append(helper.make_node("Add", [out + "_mm", f"b{i}"], [out]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [out + "_relu"]))
            out += "_relu"
        current = out
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    dim = batch if batch is not None else "batch"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="modelcache.generate")
    model.ir_version = min(model.ir_version, 9)
    return model


def mlp_hidden_for(nbytes: int, layers: int) -> int:
    """The hidden size (a multiple of 64) whose ``layers`` weight matrices total about ``nbytes``."""
    return max(64, int(round(math.sqrt(nbytes / 4 / layers) / 64)) * 64)


def save_model(model: Any, path: str, *, external_data: bool = False) -> str:
    """Save ``model`` to ``path`` (weights in ``path + '.data'`` with ``external_data``)."""
    import onnx
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if external_data:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, path)
    return path
