"""ONNX graph work for the ONNX Runtime backend: reading a model, moving its weights out of the
graph into one host block, turning them into graph inputs, and describing inputs and outputs.

Everything here is pure graph manipulation (``onnx`` only); sessions live in ``sessions.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..._fileio import read_into
from ...devices.host import HostBlock, align
from ..._optional import require
from ...errors import InvalidModelError, UnsupportedModelError

MiB = 1 << 20
WEIGHTS_FILE = "modelcache.weights"   # the external-data location the graph refers to
#: floating-point initializers from this many bytes (16 float32s) up are weights when sessions are
#: shared: fine-tunes of one architecture differ in them (e.g. biases folded from BatchNormalization).
#: Scalars stay constants (some kernels read them on the host: Clip's bounds, Pad's value).
SHARE_THRESHOLD = 64


@dataclass(frozen=True)
class Weight:
    """One initializer moved out of the graph: where it sits in the host block."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ValueInfo:
    """An input or output as ``InferenceSession.get_inputs()`` describes it: ``type`` like
    ``"tensor(float)"``, ``shape`` with ints, names of symbolic dimensions, or None."""

    name: str
    type: str
    shape: Optional[List[Any]]


def onnx_module() -> Any:
    return require("onnx", "the onnxruntime backend", "pip install 'modelcache[onnxruntime]'")


def looks_like_onnx(head: bytes) -> bool:
    """ModelProto starts with field 1 (ir_version, varint) in practice: byte 0x08."""
    return len(head) > 2 and head[0] == 0x08


def to_proto(name: str, value: Any) -> Tuple[Any, Optional[str]]:
    """The model as a ModelProto, and the folder its external data lives in (a path's: that data
    is read later, straight into the host block, not through the proto)."""
    onnx = onnx_module()
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


def constants_to_initializers(proto: Any, threshold: int) -> int:
    """Turn ``Constant`` nodes of the main graph holding floating-point tensors of at least
    ``threshold`` bytes into initializers of the same name (converters from Paddle, TensorFlow and
    older exporters store weights that way), so they are swapped like any weight. Returns how many."""
    onnx = onnx_module()
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    kept, moved = [], 0
    for node in proto.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" \
            and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 else None
        if value is not None and value.data_type in floats and tensor_nbytes(value) >= threshold:
            init = proto.graph.initializer.add()
            init.CopyFrom(value)
            init.name = node.output[0]
            moved += 1
        else:
            kept.append(node)
    if moved:
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
    return moved


def externalize(name: str, proto: Any, threshold: int, get_block: Callable[[int], HostBlock],
                put_block: Callable[[HostBlock], None], float_threshold: Optional[int] = None,
                base_dir: Optional[str] = None, has_weights: bool = False
                ) -> Tuple[bytes, List[Weight], Optional[HostBlock]]:
    """Move initializers >= threshold bytes into one host block from ``get_block`` (and, given
    ``float_threshold``, floating-point ones from that size up, when the model has large weights or
    its small floating-point ones add up to ``threshold``, or ``has_weights`` says it has); the graph refers to them as external data at their offsets in
    that block. Initializers in external-data files (under ``base_dir``) are read straight into the
    block; smaller ones that stay in the graph are loaded into it."""
    onnx = onnx_module()
    from onnx import numpy_helper
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    sized = []
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL and base_dir is None:
            raise InvalidModelError(f"initializer {init.name!r} still refers to external data that "
                                    f"was not loaded", model=name)
        sized.append((init, tensor_nbytes(init)))
    big = [(init, n) for init, n in sized if n >= threshold]
    if float_threshold is not None:   # a model with weights (large ones, or many small): small float ones join
        small = [(init, n) for init, n in sized if init.data_type in floats and float_threshold <= n < threshold]
        if big or has_weights or sum(n for _, n in small) >= threshold:
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
    block = get_block(offset) if weights else None
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
            put_block(block)
        raise


def as_inputs(proto: Any, weights: Sequence[Weight], generic: bool = False, any_size: bool = False) -> bytes:
    """The graph with the given initializers turned into graph inputs. With ``generic``, also
    without what differs between fine-tunes of one architecture but does not change what it
    computes (the graph's name and doc strings), so such models serialize to the same bytes and
    can share one session. Shapes stay as declared (ONNX Runtime plans memory statically for
    them), unless ``any_size``: then every dimension of the graph's inputs and outputs becomes
    symbolic and intermediate shapes go, so models of one topology at several sizes share one
    session too, at some cost to every run."""
    onnx = onnx_module()
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
    if generic or any_size:
        graph = proto.graph
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            value.doc_string = ""
        graph.name, graph.doc_string, proto.doc_string = "modelcache", "", ""
        for node in graph.node:
            node.doc_string = ""
    if any_size:
        graph = proto.graph
        for value in list(graph.input) + list(graph.output):
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                    dim.Clear()
                    dim.dim_param = f"{value.name}:{axis}"
        del graph.value_info[:]
    serialized: bytes = proto.SerializeToString()
    return serialized


def transpose_matmul_weights(proto: Any, weights: Sequence[Weight], block: HostBlock) -> Tuple[List[Weight], int]:
    """Store each 2-D float32 weight that is only ever the right-hand matrix of a ``MatMul``,
    ``Gemm`` or ``FusedMatMul`` transposed in ``block``, and have those nodes read it so
    (``transB=1``; a ``MatMul`` becomes ONNX Runtime's ``FusedMatMul``). For the CPU provider:
    it pre-packs only constant weights, so a weight that is a graph input is packed again by every
    run, and from the transposed layout that costs less (a BERT-like builder: 1.13-1.14 -> 1.07 x
    a plain session's run time). The rewrite depends on the graph alone, so fine-tunes still share a session.
    Returns the weights (transposed ones with their new shape) and how many were transposed."""
    onnx = onnx_module()
    helper = onnx.helper
    by_name = {w.name: w for w in weights}
    uses: Dict[str, List[Tuple[Any, int]]] = {}
    for node in proto.graph.node:
        for index, name in enumerate(node.input):
            if name in by_name:
                uses.setdefault(name, []).append((node, index))
    outputs = {o.name for o in proto.graph.output}

    def attribute(node: Any, key: str, default: Any) -> Any:
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)

    def reads_b(node: Any, index: int) -> bool:
        if index != 1:
            return False
        if node.domain in ("", "ai.onnx") and node.op_type == "MatMul":
            return True
        if node.domain in ("", "ai.onnx") and node.op_type == "Gemm":
            return not attribute(node, "transB", 0)
        if node.domain == "com.microsoft" and node.op_type == "FusedMatMul":
            return not attribute(node, "transB", 0) and not attribute(node, "transBatchB", 0)
        return False

    def read_transposed(node: Any) -> None:
        if node.op_type == "MatMul":
            node.op_type, node.domain = "FusedMatMul", "com.microsoft"
        kept = [a for a in node.attribute if a.name != "transB"]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("transB", 1)])

    result: List[Weight] = []
    transposed: Set[str] = set()
    for w in weights:
        used = uses.get(w.name, [])
        if (len(w.shape) == 2 and np.dtype(w.dtype) == np.float32 and w.name not in outputs and used
                and all(reads_b(node, index) for node, index in used)):
            rows, cols = w.shape
            span = block.array[w.offset:w.offset + w.nbytes]
            span[:] = np.ascontiguousarray(span.view(np.float32).reshape(rows, cols).T).view(np.uint8).reshape(-1)
            for node, _ in used:
                read_transposed(node)
            result.append(Weight(w.name, w.dtype, (cols, rows), w.offset, w.nbytes))
            transposed.add(w.name)
        else:
            result.append(w)
    if transposed:
        kept_info = [v for v in proto.graph.value_info if v.name not in transposed]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept_info)
        if not any(op.domain == "com.microsoft" for op in proto.opset_import):
            proto.opset_import.extend([helper.make_opsetid("com.microsoft", 1)])
    return result, len(transposed)


def group_key(graph: bytes, options: Dict[str, Any], name: Optional[str]) -> str:
    """Models with the same key can share a session: same rewritten graph, same session options
    (``name`` set: a group of its own)."""
    digest = hashlib.sha256(graph)
    settings = {k: options.get(k) for k in ("provider_options", "session_options", "shared_arena")}
    digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    if name is not None:
        digest.update(b"\0" + name.encode())
    return digest.hexdigest()


def signature(proto: Any, input_names: Sequence[str]) -> Tuple[List[ValueInfo], List[ValueInfo]]:
    """The model's inputs (those named) and outputs, as ``InferenceSession`` would describe them."""
    onnx = onnx_module()
    wanted = set(input_names)

    def elem(elem_type: int) -> str:
        try:
            return str(onnx.helper.tensor_dtype_to_string(elem_type).split(".")[-1].lower())
        except Exception:
            return "undefined"

    def kind(tp: Any) -> str:       # as ONNX Runtime writes it: tensor(float), seq(tensor(float))...
        which = tp.WhichOneof("value")
        if which == "sequence_type":
            return f"seq({kind(tp.sequence_type.elem_type)})"
        if which == "map_type":
            return f"map({elem(tp.map_type.key_type)},{kind(tp.map_type.value_type)})"
        if which == "optional_type":
            return f"optional({kind(tp.optional_type.elem_type)})"
        if which == "sparse_tensor_type":
            return f"sparse_tensor({elem(tp.sparse_tensor_type.elem_type)})"
        return f"tensor({elem(tp.tensor_type.elem_type)})"

    def info(value: Any) -> ValueInfo:
        if value.type.WhichOneof("value") not in (None, "tensor_type"):
            return ValueInfo(value.name, kind(value.type), None)
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        return ValueInfo(value.name, kind(value.type), shape)

    return ([info(v) for v in proto.graph.input if v.name in wanted], [info(v) for v in proto.graph.output])


def sample_specs(proto: Any, names: Sequence[str]) -> Optional[List[Tuple[str, Any, List[int]]]]:
    """(name, dtype, shape) of each input for a warm-up run (symbolic dimensions become 1), or
    None if an input's type cannot be sampled."""
    onnx = onnx_module()
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


def numpy_dtype(ort_type: str) -> Optional[Any]:
    """``"tensor(float)"`` -> ``np.float32``; None for types numpy cannot hold."""
    return _ORT_DTYPES.get(ort_type)


def sample_feed(inputs: Sequence[Any], seed: int = 0, symbolic: int = 1) -> Dict[str, np.ndarray]:
    """A deterministic sample input for each graph input: a symbolic first dimension (the batch)
    becomes 1, other symbolic dimensions ``symbolic``."""
    rng = np.random.default_rng(seed)
    feed: Dict[str, np.ndarray] = {}
    for i in inputs:
        dtype = _ORT_DTYPES.get(i.type)
        if dtype is None:
            raise ValueError(f"input {i.name!r} of type {i.type} cannot be sampled")
        shape = [d if isinstance(d, int) and d > 0 else (1 if axis == 0 else symbolic)
                 for axis, d in enumerate(i.shape or [])]
        if np.issubdtype(dtype, np.floating):
            feed[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feed[i.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feed[i.name] = rng.integers(0, 2, shape).astype(dtype)
    return feed


def tensor_nbytes(init: Any) -> int:
    onnx = onnx_module()
    if init.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    count = int(np.prod(init.dims)) if len(init.dims) else 1
    itemsize: int = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return count * itemsize


# external data --------------------------------------------------------------------------------
def _external_entry(name: str, init: Any, base_dir: Optional[str]) -> Tuple[str, int, Optional[int]]:
    """(file path, offset, length) of an initializer's external data, checked to lie in base_dir.

    The location is checked as written (no absolute path, no ``..`` out of the folder); a file there
    may be a link (a Hugging Face cache snapshot links every file to its blob)."""
    info = {e.key: e.value for e in init.external_data}
    location = info.get("location", "")
    root = os.path.abspath(base_dir or ".")
    path = os.path.normpath(os.path.join(root, location))
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
            got = read_into(f, out.data)
    except OSError as exc:
        raise InvalidModelError(f"initializer {init.name!r}: cannot read {path}: {exc}", model=name) from exc
    if got != out.nbytes:
        raise InvalidModelError(f"initializer {init.name!r}: {path} ends after {got} of {out.nbytes} B "
                                f"(offset {offset})", model=name)


def _load_external(name: str, init: Any, base_dir: Optional[str]) -> None:
    """Load a (small) initializer's external data into the proto itself."""
    onnx = onnx_module()
    data = np.empty(tensor_nbytes(init), dtype=np.uint8)
    _read_external(name, init, base_dir, data)
    init.raw_data = data.tobytes()
    init.data_location = onnx.TensorProto.DEFAULT
    del init.external_data[:]
