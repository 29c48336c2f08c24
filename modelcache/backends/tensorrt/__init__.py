"""The "tensorrt" backend, one file per concern:

| file | what |
|---|---|
| ``backend.py`` | :class:`TensorRTBackend`: load, moves between plan bytes, ``.plan`` files and engines |
| ``runtime.py`` | the TensorRT module and its log, :class:`TrtModel` (what ``use()`` hands out), scratch memory |
| ``plans.py`` | plan files, sidecars, the environment a plan is tied to |
| ``build.py`` | ONNX -> plan: build options, the build cache |
"""
from .backend import TensorRTBackend, TrtHandle
from .build import BuildCache, BuildOptions, build_plan, parse_shapes, profiles_from_shapes
from .plans import environment
from .runtime import TrtModel, import_trt

__all__ = ["TensorRTBackend", "TrtHandle", "TrtModel", "BuildCache", "BuildOptions", "build_plan", "parse_shapes",
           "profiles_from_shapes", "environment", "import_trt"]
