"""ONNX builders of the operator families real architectures are made of, for tests and CPU
benchmarks where torch is not installed (the GPU zoo, ``benchmarks/zoo.py``, exports the real
models). Each builder returns an ``onnx.ModelProto`` with random weights drawn from ``seed``:
the same arguments with another seed give a fine-tune-like variant (same graph, other weights).

- :func:`make_resnet`: Conv + BatchNormalization + Relu with residual Adds, global pooling, Gemm.
- :func:`make_bert`: token and position embeddings (Gather), LayerNormalization, multi-head
  attention (MatMul, Reshape, Transpose, Softmax), erf-GELU, residual Adds.
- :func:`make_mobilenet`: depthwise and pointwise convolutions with HardSwish, pooling, Gemm.
- any of them with ``constant_nodes=True``: weights stored as ``Constant`` nodes instead of
  initializers, as converters from Paddle, TensorFlow and older exporters write them.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

FAMILIES = ("resnet", "bert", "mobilenet")


class _Graph:
    """A small helper that names tensors and collects nodes and weights."""

    def __init__(self, seed: int, constant_nodes: bool) -> None:
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.rng = np.random.default_rng(seed)
        self.constant_nodes = constant_nodes
        self.nodes: List[Any] = []
        self.inits: List[Any] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def weight(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        if self.constant_nodes:
            self.nodes.append(self.helper.make_node("Constant", [], [name],
                                                    value=self.numpy_helper.from_array(array, name)))
        else:
            self.inits.append(self.numpy_helper.from_array(array, name))
        return name

    def const(self, prefix: str, array: np.ndarray) -> str:
        """A small constant (shapes, axes): always an initializer."""
        name = self.name(prefix)
        self.inits.append(self.numpy_helper.from_array(array, name))
        return name

    def random(self, prefix: str, shape: Sequence[int], scale: float) -> str:
        return self.weight(prefix, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def model(self, name: str, inputs: Sequence[Any], outputs: Sequence[Any], opset: int = 17) -> Any:
        graph = self.helper.make_graph(self.nodes, name, list(inputs), list(outputs), self.inits)
        model = self.helper.make_model(graph, opset_imports=[self.helper.make_opsetid("", opset)],
                                       producer_name="modelcache.tools.families")
        model.ir_version = 9
        return model


def _conv_bn(g: _Graph, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: Optional[str] = "Relu") -> str:
    w = g.random("conv_w", (cout, cin // groups, k, k), math.sqrt(2.0 / (cin // groups * k * k)))
    y = g.op("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=groups)
    scale = g.weight("bn_scale", (1.0 + 0.1 * g.rng.standard_normal(cout)).astype(np.float32))
    bias = g.weight("bn_bias", (0.1 * g.rng.standard_normal(cout)).astype(np.float32))
    mean = g.weight("bn_mean", (0.1 * g.rng.standard_normal(cout)).astype(np.float32))
    var = g.weight("bn_var", (1.0 + 0.1 * np.abs(g.rng.standard_normal(cout))).astype(np.float32))
    y = g.op("BatchNormalization", [y, scale, bias, mean, var], epsilon=1e-5)
    return g.op(act, [y]) if act else y


def _head(g: _Graph, x: str, channels: int, classes: int) -> str:
    pooled = g.op("GlobalAveragePool", [x])
    flat = g.op("Flatten", [pooled], axis=1)
    w = g.random("fc_w", (classes, channels), 1.0 / math.sqrt(channels))
    b = g.random("fc_b", (classes,), 0.1)
    return g.op("Gemm", [flat, w, b], transB=1)


def make_resnet(width: int = 32, blocks: int = 2, *, image: int = 32, classes: int = 100, seed: int = 0,
                constant_nodes: bool = False, batch: Optional[int] = 1) -> Any:
    """A residual network: a stem, ``blocks`` stages of two basic blocks (the first with a
    strided projection), each conv followed by BatchNormalization. Input ``x``: [batch, 3,
    image, image]; output ``logits``: [batch, classes]."""
    from onnx import TensorProto, helper
    g = _Graph(seed, constant_nodes)
    x = _conv_bn(g, "x", 3, width, 3)
    channels = width
    for stage in range(blocks):
        out_channels = width * 2 ** stage
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = _conv_bn(g, x, channels, out_channels, 3, stride)
            y = _conv_bn(g, y, out_channels, out_channels, 3, act=None)
            skip = x if stride == 1 and channels == out_channels else _conv_bn(g, x, channels, out_channels, 1,
                                                                               stride, act=None)
            x = g.op("Relu", [g.op("Add", [y, skip])])
            channels = out_channels
    logits = g.op("Identity", [_head(g, x, channels, classes)])
    dim: Any = batch if batch is not None else "batch"
    return g.model("resnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 3, image, image])],
                   [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [dim, classes])])


def make_mobilenet(width: int = 32, blocks: int = 3, *, image: int = 32, classes: int = 100, seed: int = 0,
                   constant_nodes: bool = False, batch: Optional[int] = 1) -> Any:
    """Inverted residual blocks: pointwise expansion, depthwise 3x3 convolution, pointwise
    projection, with HardSwish activations. Input ``x``: [batch, 3, image, image]."""
    from onnx import TensorProto, helper
    g = _Graph(seed, constant_nodes)
    x = _conv_bn(g, "x", 3, width, 3, stride=2, act="HardSwish")
    channels = width
    for block in range(blocks):
        expanded = channels * 4
        y = _conv_bn(g, x, channels, expanded, 1, act="HardSwish")
        y = _conv_bn(g, y, expanded, expanded, 3, groups=expanded, act="HardSwish")
        y = _conv_bn(g, y, expanded, channels, 1, act=None)
        x = g.op("Add", [x, y])
    x = _conv_bn(g, x, channels, channels * 4, 1, act="HardSwish")
    logits = g.op("Identity", [_head(g, x, channels * 4, classes)])
    dim: Any = batch if batch is not None else "batch"
    return g.model("mobilenet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 3, image, image])],
                   [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [dim, classes])])


def make_bert(hidden: int = 64, layers: int = 2, heads: int = 4, *, vocab: int = 512, seq: int = 16,
              seed: int = 0, constant_nodes: bool = False, batch: Optional[int] = 1) -> Any:
    """A transformer encoder: token and position embeddings, then ``layers`` blocks of multi-head
    self-attention and an erf-GELU feed-forward, each with a residual Add and LayerNormalization.
    Input ``input_ids``: int64 [batch, seq]; output ``hidden``: [batch, seq, hidden]."""
    from onnx import TensorProto, helper
    g = _Graph(seed, constant_nodes)
    head_dim = hidden // heads
    tokens = g.op("Gather", [g.random("word_embeddings", (vocab, hidden), 0.5), "input_ids"], axis=0)
    positions = g.random("position_embeddings", (seq, hidden), 0.5)
    x = g.op("Add", [tokens, positions])

    def layer_norm(t: str) -> str:
        gamma = g.weight("ln_gamma", (1.0 + 0.1 * g.rng.standard_normal(hidden)).astype(np.float32))
        beta = g.weight("ln_beta", (0.1 * g.rng.standard_normal(hidden)).astype(np.float32))
        return g.op("LayerNormalization", [t, gamma, beta], axis=-1, epsilon=1e-5)

    def dense(t: str, nin: int, nout: int) -> str:
        return g.op("Add", [g.op("MatMul", [t, g.random("dense_w", (nin, nout), 1.0 / math.sqrt(nin))]),
                            g.random("dense_b", (nout,), 0.05)])

    x = layer_norm(x)
    split = g.const("heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge = g.const("merge_shape", np.array([0, 0, hidden], np.int64))
    for _ in range(layers):
        q, k, v = (g.op("Transpose", [g.op("Reshape", [dense(x, hidden, hidden), split])], perm=[0, 2, 1, 3])
                   for _ in range(3))
        kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = g.op("Mul", [g.op("MatMul", [q, kt]), g.const("scale", np.array(math.sqrt(1.0 / head_dim),
                                                                                np.float32))])
        attention = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        merged = g.op("Reshape", [g.op("Transpose", [attention], perm=[0, 2, 1, 3]), merge])
        x = layer_norm(g.op("Add", [x, dense(merged, hidden, hidden)]))
        h = dense(x, hidden, 4 * hidden)
        gelu = g.op("Mul", [g.op("Mul", [h, g.op("Add", [g.op("Erf", [g.op("Div", [h, g.const(
            "sqrt2", np.array(math.sqrt(2.0), np.float32))])]), g.const("one", np.array(1.0, np.float32))])]),
            g.const("half", np.array(0.5, np.float32))])
        x = layer_norm(g.op("Add", [x, dense(gelu, 4 * hidden, hidden)]))
    out = g.op("Identity", [x])
    dim: Any = batch if batch is not None else "batch"
    model = g.model("bert", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [dim, seq])],
                    [helper.make_tensor_value_info(out, TensorProto.FLOAT, [dim, seq, hidden])])
    helper.set_model_props(model, {"vocab": str(vocab)})
    return model


def make_family(family: str, size: str = "small", *, seed: int = 0, constant_nodes: bool = False) -> Any:
    """One of :data:`FAMILIES` at a preset size: ``"small"`` (a few hundred KiB: unit tests) or
    ``"medium"`` (tens of MiB: CPU benchmarks)."""
    presets = {
        ("resnet", "small"): dict(width=16, blocks=2, image=32),
        ("resnet", "medium"): dict(width=32, blocks=4, image=64),
        ("bert", "small"): dict(hidden=64, layers=2, heads=4, vocab=512, seq=16),
        ("bert", "medium"): dict(hidden=256, layers=4, heads=4, vocab=8192, seq=128),
        ("mobilenet", "small"): dict(width=16, blocks=2, image=32),
        ("mobilenet", "medium"): dict(width=64, blocks=6, image=64),
    }
    builders = {"resnet": make_resnet, "bert": make_bert, "mobilenet": make_mobilenet}
    if (family, size) not in presets:
        raise ValueError(f"family={family!r}, size={size!r}: use one of {FAMILIES} and 'small' or 'medium'")
    return builders[family](**presets[(family, size)], seed=seed, constant_nodes=constant_nodes)  # type: ignore


def sample_input(model: Any, seed: int = 0) -> Dict[str, np.ndarray]:
    """A deterministic input for a model built here (token ids below the vocabulary for BERT)."""
    rng = np.random.default_rng(seed)
    feed: Dict[str, np.ndarray] = {}
    for value in model.graph.input:
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == 7:   # int64: token ids below the vocabulary
            vocab = int({p.key: p.value for p in model.metadata_props}.get("vocab", 2))
            feed[value.name] = rng.integers(0, vocab, dims).astype(np.int64)
        else:
            feed[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feed
