"""Leases typed by what they hand out. Checked by mypy --strict (tests/typing/test_typing.py),
never run. A comment ending a line states what mypy says there: "R: T", that ``reveal_type``
gives exactly T; "R^: T", a type starting with T (``builtins.`` left out); "E: code", an error
with that code. Any other error fails the test."""
from typing import Any, Dict, List

import numpy as np

import modelcache as mc
from modelcache.backends.onnxruntime import OrtModel
from modelcache.decorators import ModelFunction, MultiplexedFunction

cache = mc.ModelCache(monitor=mc.SimulatedDevice("1GiB"))

# use() and ause(): the backend is chosen at run time, so the model is Any
reveal_type(cache.use("bert"))  # R: modelcache.lease.Lease[Any]
reveal_type(cache.ause("bert", timeout=None, allow_host=True))  # R: modelcache.lease.Lease[Any]
with cache.use("bert") as model:
    reveal_type(model)  # R: Any


# @cache.model: the lease hands out what the loader returns (python/auto backends)
@cache.model("weights")
def load_weights() -> np.ndarray:
    return np.zeros(4, dtype=np.float32)


reveal_type(load_weights)  # R^: modelcache.decorators.ModelFunction[numpy.ndarray[
with load_weights() as weights:
    reveal_type(weights)  # R^: numpy.ndarray[
reveal_type(load_weights(timeout=1.0).acquire())  # R^: numpy.ndarray[
reveal_type(load_weights().model)  # R^: numpy.ndarray[
reveal_type(load_weights.model_name)  # R: str
reveal_type(load_weights.cache)  # R: modelcache.cache.ModelCache
reveal_type(load_weights.__name__)  # R: str


@cache.model("table", backend="python")
async def load_table() -> Dict[str, List[int]]:      # an async loader: what it returns once awaited
    return {"a": [1, 2]}


async def serve() -> None:
    async with load_table() as table:
        reveal_type(table)  # R: dict[str, list[int]]
    reveal_type(await load_table().aacquire())  # R: dict[str, list[int]]
    async with cache.ause("bert") as anything:
        reveal_type(anything)  # R: Any


# backends that hand out their own model object, whatever the loader returns
@cache.model("bert", backend="onnxruntime")
def load_bert() -> str:
    return "models/bert.onnx"


with load_bert() as session:
    reveal_type(session)  # R: modelcache.backends.onnxruntime.model.OrtModel


@cache.model("resnet", backend="tensorrt")
async def load_resnet() -> str:
    return "models/resnet.plan"


with load_resnet() as engine:
    reveal_type(engine)  # R: modelcache.backends.tensorrt.runtime.TrtModel


# "auto" may choose another backend for a path or bytes: the model is Any then
@cache.model("path")
def load_path() -> str:
    return "models/x.onnx"


@cache.model("blob")
async def load_blob() -> bytes:
    return b""


with load_path() as a, load_blob() as b:
    reveal_type(a)  # R: Any
    reveal_type(b)  # R: Any


@cache.model("custom", backend=mc.Backend)       # a backend class: Any
def load_custom() -> int:
    return 1


with load_custom() as c:
    reveal_type(c)  # R: Any


@cache.model("untyped")
def load_untyped():  # type: ignore[no-untyped-def]
    return 1


with load_untyped() as u:
    reveal_type(u)  # R: Any


# @cache.multiplexed: one loader for many ids
@cache.multiplexed(max_models=4)
def load_adapter(model_id: str) -> np.ndarray:
    return np.zeros(2)


@cache.multiplexed(prefix="tables/", backend="python")
async def load_named(model_id: str) -> List[str]:
    return [model_id]


@cache.multiplexed(backend="onnxruntime", check_id=r"[a-z0-9-]+")
async def load_onnx(model_id: str) -> str:
    return f"models/{model_id}.onnx"


reveal_type(load_adapter)  # R^: modelcache.decorators.MultiplexedFunction[numpy.ndarray[
with load_adapter("en") as adapter:
    reveal_type(adapter)  # R^: numpy.ndarray[
with load_named("t1", timeout=None) as named:
    reveal_type(named)  # R: list[str]
with load_onnx("en-v2") as onnx_session:
    reveal_type(onnx_session)  # R: modelcache.backends.onnxruntime.model.OrtModel
reveal_type(load_adapter.model_ids())  # R: list[str]

# the protocols, and Lease itself, can be used in annotations; Lease is covariant
typed_fn: ModelFunction[np.ndarray] = load_weights
typed_mux: MultiplexedFunction[OrtModel] = load_onnx
wider: mc.Lease[object] = load_weights()


def first(lease: mc.Lease[List[str]]) -> str:
    with lease as values:
        return values[0]


reveal_type(first(load_named("x")))  # R: str
any_lease: mc.Lease[Any] = cache.use("bert")
