"""The models a stress run serves: generated ONNX MLPs (with a reference output each) or the
user's own files, and the check that a response is right."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ...errors import ConfigError


@dataclass
class ModelSpec:
    name: str
    path: str
    nbytes: int                 #: weights bytes
    x: np.ndarray               #: the input every request sends
    reference: np.ndarray       #: the expected output




def generate_models(folder: str, count: int, min_bytes: int, max_bytes: int, layers: int = 4,
                    seed: int = 0) -> List[ModelSpec]:
    """``count`` ONNX MLPs with weights spread log-uniformly over [min_bytes, max_bytes], saved with
    external data under ``folder`` (reused when already there), with a reference output each.
    The weights are written straight to the data file (no copy through protobuf): 40 models of
    up to 1 GiB take seconds, not minutes."""
    from onnx import TensorProto, helper

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    lo, hi = math.log(max(min_bytes, 4096)), math.log(max(max_bytes, min_bytes, 4096))
    specs = []
    pool: Optional[np.ndarray] = None   # random floats; each weight matrix is a slice at a random offset
    for k in range(count):
        target = math.exp(rng.uniform(lo, hi)) if hi > lo else math.exp(lo)
        hidden = max(16, int(round(math.sqrt(target / 4 / layers) / 16)) * 16)
        name = f"mlp{k:02d}-{hidden}"
        path = os.path.join(folder, f"{name}.onnx")
        ref_path = path + ".ref.npz"
        x = rng.standard_normal((1, hidden)).astype(np.float32)
        if not (os.path.exists(path) and os.path.exists(ref_path)):
            mrng = np.random.default_rng([seed, k])
            if pool is None or pool.size < 2 * hidden * hidden:
                pool = np.random.default_rng([seed, 1 << 20]).standard_normal(
                    max(2 * hidden * hidden, 1 << 26), dtype=np.float32)
                pool *= np.float32(1.7 / 64)      # ~ 1.7 / sqrt(hidden) at hidden 4096: outputs stay moderate
            data_name = os.path.basename(path) + ".data"
            h = x.copy()
            inits, nodes, current = [], [], "x"
            nbytes = hidden * hidden * 4
            with open(path + ".data.tmp", "wb") as f:
                for i in range(layers):
                    offset = int(mrng.integers(0, pool.size - hidden * hidden + 1))
                    w = pool[offset:offset + hidden * hidden].reshape(hidden, hidden)
                    h = h @ w
                    if i < layers - 1:
                        h = np.maximum(h, 0)
                    w.tofile(f)
                    del w
                    init = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[hidden, hidden],
                                       data_location=TensorProto.EXTERNAL)
                    for key, val in (("location", data_name), ("offset", str(i * nbytes)), ("length", str(nbytes))):
                        entry = init.external_data.add()
                        entry.key, entry.value = key, val
                    inits.append(init)
                    nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}"]))
                    current = f"h{i}"
                    if i < layers - 1:
                        nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
                        current = f"r{i}"
            nodes.append(helper.make_node("Identity", [current], ["y"]))
            graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])], inits)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 9
            os.replace(path + ".data.tmp", os.path.join(folder, data_name))
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            os.replace(tmp, path)
            np.savez(ref_path, x=x, y=h)
        ref = np.load(ref_path)
        specs.append(ModelSpec(name, path, layers * hidden * hidden * 4, ref["x"], ref["y"]))
    return specs


def specs_from_files(paths: Sequence[str]) -> List[ModelSpec]:
    """The user's own ONNX files: a sample input each, the reference from a CPU session."""
    import onnxruntime as ort
    from ...backends.onnxruntime.graph import sample_feed
    specs = []
    for path in paths:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"{path}: stress models must have one input (this one has {len(inputs)})")
        x = sample_feed(inputs)[inputs[0].name]
        y = session.run(None, {inputs[0].name: x})[0]
        nbytes = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))
        specs.append(ModelSpec(os.path.splitext(os.path.basename(path))[0], path, nbytes, x, y))
    return specs


def output_ok(out: np.ndarray, ref: np.ndarray) -> bool:
    """Loose enough for TF32 and summation order, tight enough to catch another model's output."""
    scale = float(np.max(np.abs(ref))) or 1.0
    return out.shape == ref.shape and bool(np.allclose(out, ref, rtol=2e-2, atol=2e-2 * scale))
