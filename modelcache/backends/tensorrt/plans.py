"""Plans on disk: what a plan is tied to (TensorRT, CUDA, GPU), checking that against the running
environment, and the JSON sidecar written beside each ``.plan`` file."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from ..._fileio import atomic_write, model_file, read_verified, remove_quietly
from ...errors import CorruptFileError

SIDECAR_FORMAT = 1


def environment(trt: Any, facts: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a plan is tied to: the TensorRT module and version, and the device's ``facts``
    (``DeviceMemory.describe()``: CUDA runtime version, GPU name, compute capability; None where
    unknown, e.g. on a simulated device)."""
    env: Dict[str, Any] = {"trt_module": getattr(trt, "__name__", str(trt)),
                           "trt_version": str(getattr(trt, "__version__", "unknown")),
                           "cuda_version": None, "gpu_name": None, "compute_capability": None}
    for key in ("cuda_version", "gpu_name", "compute_capability"):
        env[key] = (facts or {}).get(key)
    return env


def mismatches(plan_env: Dict[str, Any], running: Dict[str, Any]) -> List[str]:
    """Differences that stop a plan from running here; unknown values on either side are skipped."""
    out = []
    for key in ("trt_module", "trt_version", "compute_capability", "gpu_name"):
        a, b = plan_env.get(key), running.get(key)
        if a is not None and b is not None and str(a) != str(b):
            out.append(f"{key}: plan {a!r}, running {b!r}")
    a, b = plan_env.get("cuda_version"), running.get("cuda_version")
    if a and b and str(a).split(".")[0] != str(b).split(".")[0]:
        out.append(f"cuda_version: plan {a!r}, running {b!r}")
    return out


def write_sidecar(path: str, sidecar: Dict[str, Any]) -> None:
    atomic_write(path, json.dumps(sidecar, indent=2, sort_keys=True).encode())


def read_sidecar(path: str) -> Optional[Dict[str, Any]]:
    """The sidecar at ``path``; None if there is none; :class:`CorruptFileError` if it is not
    readable JSON."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"the plan's sidecar {path} is damaged: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptFileError(f"the plan's sidecar {path} is damaged: not a JSON object")
    return data


def write_plan(directory: str, name: str, plan: Any, sidecar: Dict[str, Any]) -> Tuple[str, str, Dict[str, Any]]:
    """The disk tier: ``plan`` as a ``.plan`` file with its JSON sidecar (both atomic). Returns
    (plan path, sha256, the sidecar written); nothing is left behind on failure."""
    plan_path = model_file(directory, name, ".plan")
    digest = atomic_write(plan_path, memoryview(plan))
    sidecar = dict(sidecar)
    sidecar.update({"format": SIDECAR_FORMAT, "plan_sha256": digest, "model": name})
    try:
        write_sidecar(plan_path + ".json", sidecar)
    except BaseException:
        remove_quietly(plan_path)
        raise
    return plan_path, digest, sidecar


def read_plan(plan_path: str, digest: str, name: str) -> Tuple[bytes, Dict[str, Any]]:
    """The plan written by :func:`write_plan` and its sidecar, both checked against ``digest``."""
    sidecar = read_sidecar(plan_path + ".json")
    if sidecar is None or sidecar.get("plan_sha256") != digest:
        raise CorruptFileError(f"the sidecar {plan_path}.json is missing or does not match the plan", model=name)
    return read_verified(plan_path, digest, model=name), sidecar


def remove_plan(plan_path: str) -> None:
    remove_quietly(plan_path)
    remove_quietly(plan_path + ".json")
