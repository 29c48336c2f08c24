"""The models a stress run serves, each with the input every request sends and the output it must
get back: generated ONNX MLPs of one topology, generated models of several architectures (the
CPU builders of ``tools/families.py``), the zoo of ``benchmarks/zoo.py``, or the user's own files;
and the check that a response is right."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import ConfigError


@dataclass
class ModelSpec:
    name: str
    path: str
    nbytes: int                 #: weights bytes
    feed: Dict[str, np.ndarray]  #: the input every request sends
    reference: np.ndarray       #: the expected (first) output
    architecture: str = "mlp"

    @property
    def x(self) -> np.ndarray:
        """The first input (generated MLPs have one, ``x``)."""
        return next(iter(self.feed.values()))




def generate_models(folder: str, count: int, min_bytes: int, max_bytes: int, layers: int = 4,
                    seed: int = 0, progress: Optional[Callable[[str, int, int], None]] = None) -> List[ModelSpec]:
    """``count`` ONNX MLPs with weights spread log-uniformly over [min_bytes, max_bytes], saved with
    external data under ``folder`` (reused when already there), with a reference output each.
    The weights are written straight to the data file (no copy through protobuf): 40 models of
    up to 1 GiB take seconds, not minutes. ``progress(name, done, count)`` after each model."""
    from onnx import TensorProto, helper

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    lo, hi = math.log(max(min_bytes, 4096)), math.log(max(max_bytes, min_bytes, 4096))
    specs = []
    pool: Optional[np.ndarray] = None   # random floats; each weight matrix is a slice at a random offset
    if progress:
        progress("generating models", 0, count)
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
        specs.append(ModelSpec(name, path, layers * hidden * hidden * 4, {"x": ref["x"]}, ref["y"], f"mlp{hidden}"))
        if progress:
            progress("generating models", k + 1, count)
    return specs


def specs_from_files(paths: Sequence[str], architectures: Optional[Sequence[str]] = None,
                     providers: Optional[List[Any]] = None) -> List[ModelSpec]:
    """Your own ONNX files (or the zoo's): a sample input each, the reference from a plain session
    (``providers``: default CPU). Inputs named like masks get ones, token ids small integers."""
    import onnxruntime as ort
    specs = []
    for k, path in enumerate(paths):
        session = ort.InferenceSession(path, providers=providers or ["CPUExecutionProvider"])
        rng = np.random.default_rng(k)
        feed: Dict[str, np.ndarray] = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else (1 if axis == 0 else 16) for axis, d in enumerate(i.shape)]
            if "int" in i.type:
                feed[i.name] = np.ones(shape, np.int64) if "mask" in i.name else rng.integers(0, 1000, shape)
            else:
                feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        y = session.run(None, feed)[0]
        nbytes = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))
        name = os.path.splitext(os.path.basename(path))[0]
        arch = architectures[k] if architectures else name
        specs.append(ModelSpec(name, path, nbytes, feed, y, arch))
    return specs


def zoo_specs(folder: str, providers: Optional[List[Any]] = None) -> List[ModelSpec]:
    """The models ``benchmarks/zoo.py`` exported into ``folder`` (``NAME.onnx``, fine-tunes
    ``NAME-ftK.onnx``): architecture = the name without the suffix."""
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".onnx"))
    if not paths:
        raise ConfigError(f"no .onnx files in {folder}: export the zoo first (python benchmarks/zoo.py --export-only)")
    return specs_from_files(paths, [os.path.basename(p)[:-5].split("-ft")[0] for p in paths], providers)


def family_specs(folder: str, count: int, seed: int = 0,
                 progress: Optional[Callable[[str, int, int], None]] = None) -> List[ModelSpec]:
    """``count`` generated models of distinct architectures and their fine-tunes (CPU builders of
    ``tools/families.py``: ResNet-, BERT- and MobileNet-like at a few widths), saved under
    ``folder`` with a reference output each. ``progress(name, done, count)`` after each model."""
    from ..families import make_bert, make_mobilenet, make_resnet, sample_input
    from ..generate import save_model
    import onnxruntime as ort
    shapes: List[Tuple[str, Callable[[int], Any]]]     # (architecture, seed -> an ONNX model)
    shapes = [("resnet16", lambda s: make_resnet(width=16, blocks=2, image=32, seed=s)),
              ("bert64", lambda s: make_bert(hidden=64, layers=2, heads=4, vocab=512, seq=16, seed=s)),
              ("mobilenet16", lambda s: make_mobilenet(width=16, blocks=2, image=32, seed=s)),
              ("resnet24", lambda s: make_resnet(width=24, blocks=2, image=32, seed=s)),
              ("bert128", lambda s: make_bert(hidden=128, layers=4, heads=4, vocab=2048, seq=16, seed=s)),
              ("mobilenet32", lambda s: make_mobilenet(width=32, blocks=2, image=32, seed=s))]
    os.makedirs(folder, exist_ok=True)
    specs = []
    if progress:
        progress("generating models", 0, count)
    for k in range(count):
        arch, build = shapes[k % len(shapes)]
        variant = k // len(shapes)
        model = build(seed + 100 * variant)
        path = save_model(model, os.path.join(folder, f"{arch}-ft{variant}.onnx"))
        feed = sample_input(model, seed=k)
        y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        nbytes = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer if i.data_type == 1)
        specs.append(ModelSpec(f"{arch}-ft{variant}", path, nbytes, feed, y, arch))
        if progress:
            progress("generating models", k + 1, count)
    return specs


def output_ok(out: np.ndarray, ref: np.ndarray) -> bool:
    """Loose enough for TF32 and summation order, tight enough to catch another model's output."""
    scale = float(np.max(np.abs(ref))) or 1.0
    return out.shape == ref.shape and bool(np.allclose(out, ref, rtol=2e-2, atol=2e-2 * scale))
