"""The "onnxruntime" backend, one file per concern:

| file | what |
|---|---|
| ``backend.py`` | :class:`OnnxRuntimeBackend`: load, choosing the swap mode, moves, disk tier |
| ``model.py`` | :class:`OrtModel`, what ``use()`` hands out |
| ``graph.py`` | reading models, moving weights out of the graph, rewriting, signatures |
| ``sessions.py`` | session creation, execution providers per device type, files in RAM, the gate |
| ``handle.py`` | a model's state, and the interface of a swap mode |
| ``weights_mode.py`` | weights mode: shared sessions, weights copied to a device buffer |
| ``session_mode.py`` | session mode: a device session created from files in RAM |
"""
from .backend import OnnxRuntimeBackend
from ...errors import InvalidModelError
from .graph import ValueInfo, Weight
from .model import OrtModel

__all__ = ["OnnxRuntimeBackend", "OrtModel", "InvalidModelError", "Weight", "ValueInfo"]
