"""Misuse that mypy must refuse (expectations in comments, as in snippet_leases.py)."""
import numpy as np

import modelcache as mc

cache = mc.ModelCache(monitor=mc.SimulatedDevice("1GiB"))

cache.use(3)  # E: arg-type
cache.ause("bert", timeout="1s")  # E: arg-type
cache.use("bert", allow_host=1.5)  # E: arg-type
cache.model("bert", backend=3)  # E: call-overload


@cache.model("weights")
def load_weights() -> np.ndarray:
    return np.zeros(4)


@cache.multiplexed()
def load_adapter(model_id: str) -> np.ndarray:
    return np.zeros(2)


load_weights("en")  # E: arg-type
load_adapter(7)  # E: arg-type
load_adapter()  # E: call-arg

with load_weights() as weights:
    weights.no_such_attribute  # E: attr-defined

with load_adapter("en") as adapter:
    name: str = adapter  # E: assignment

narrow: mc.Lease[str] = load_weights()  # E: assignment


@cache.multiplexed()  # E: arg-type
def no_id() -> int:      # a multiplexed loader takes the model id
    return 1


@cache.model("two")  # E: arg-type
def two(a: int) -> int:  # a model loader takes no arguments
    return a
