"""ONNX objects under backend="auto" (needs the onnx package; see snippet_leases.py)."""
import onnx

import modelcache as mc

cache = mc.ModelCache(monitor=mc.SimulatedDevice("1GiB"))


@cache.model("proto")
def load_proto() -> onnx.ModelProto:     # "auto" hands it to onnxruntime: an OrtModel, not a ModelProto
    return onnx.ModelProto()


@cache.model("proto-ort", backend="onnxruntime")
async def load_ort() -> onnx.ModelProto:
    return onnx.ModelProto()


with load_proto() as model:
    reveal_type(model)  # R: Any
with load_ort() as ort_model:
    reveal_type(ort_model)  # R: modelcache.backends.onnxruntime.model.OrtModel
