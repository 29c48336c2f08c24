"""The "python" backend: plain objects whose size is known.

Accepts numpy arrays, bytes, anything with an ``nbytes`` attribute, torch tensors and modules,
lists/tuples/dicts of those, or any object when ``size_hint`` is given. On the device tier torch
objects are moved with ``.to(memory.torch_device)`` and the object's bytes are charged to the
device (booked on a simulated device; on a GPU torch's own allocation shows, and other objects are
only accounted by the cache). The disk tier writes ``.npy`` for numpy arrays and pickles otherwise.
"""
from __future__ import annotations

import io
import pickle
import sys
from typing import Any, Dict, Optional

from .._fileio import atomic_write, model_file, read_verified, remove_quietly
from ..errors import UnsupportedModelError
from ..tiers import Tier
from .base import Backend, Handle


def measure_nbytes(value: Any) -> Optional[int]:
    """Bytes held by ``value``, or None if it cannot be told."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) if not isinstance(value, memoryview) else value.nbytes
    if _is_torch_module(value):
        tensors = list(value.parameters()) + list(value.buffers())
        return sum(int(t.numel() * t.element_size()) for t in tensors)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int) and not isinstance(nbytes, bool):
        return nbytes
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)) and value:
        sizes = [measure_nbytes(v) for v in value]
        known = [s for s in sizes if s is not None]
        return sum(known) if len(known) == len(sizes) else None
    return None


def _torch_kind(value: Any) -> Optional[str]:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, torch.nn.Module):
        return "module"
    return None


def _return_cached_cuda_memory() -> None:
    """torch keeps freed blocks in its caching allocator, invisible to other processes and to
    NVML's free memory: hand them back so the eviction shows as free memory (a no-op where torch
    never used CUDA)."""
    cuda = sys.modules["torch"].cuda
    if cuda.is_initialized():
        cuda.empty_cache()


def _is_torch_module(value: Any) -> bool:
    return _torch_kind(value) == "module"


class PythonHandle(Handle):
    def __init__(self, name: str, obj: Any, nbytes: int) -> None:
        super().__init__(name, Tier.HOST)
        self.obj = obj
        self.nbytes = nbytes
        self.host_bytes = nbytes
        self.charge: Any = None        # devices.Charge while on the device
        self.sha256: Optional[str] = None
        self.format: Optional[str] = None

    def estimated_device_bytes(self) -> int:
        return self.nbytes

    def estimated_host_bytes(self) -> int:
        return self.nbytes

    def details(self) -> Dict[str, Any]:
        return {"type": type(self.obj).__name__ if self.obj is not None else None, "nbytes": self.nbytes}


class PythonBackend(Backend):
    """Plain objects of known size. See the module docstring."""

    name = "python"

    @classmethod
    def accepts(cls, value: Any, options: Dict[str, Any]) -> bool:
        return options.get("size_hint") is not None or measure_nbytes(value) is not None

    def _load_impl(self, name: str, value: Any, options: Dict[str, Any]) -> PythonHandle:
        measured = measure_nbytes(value)      # a size_hint plans the first load; what is measured counts
        nbytes = measured if measured is not None else options.get("size_hint")
        if nbytes is None:
            raise UnsupportedModelError(
                f"the python backend cannot tell the size of a {type(value).__name__}; "
                f"give it an nbytes attribute or register it with size_hint=", model=name)
        return PythonHandle(name, value, int(nbytes))

    def _to_device_impl(self, handle: PythonHandle) -> None:
        memory = self.context.memory
        charge = memory.charge(handle.nbytes, owner=handle.name)
        try:
            if _torch_kind(handle.obj) is not None:
                handle.obj = handle.obj.to(memory.torch_device)
        except BaseException:
            charge.free()
            raise
        handle.charge = charge
        handle.device_bytes = handle.nbytes
        handle.host_bytes = 0

    def _to_host_impl(self, handle: PythonHandle) -> None:
        if _torch_kind(handle.obj) is not None:
            handle.obj = handle.obj.to("cpu")
            _return_cached_cuda_memory()
        self._uncharge(handle)
        handle.host_bytes = handle.nbytes

    @staticmethod
    def _uncharge(handle: PythonHandle) -> None:
        if handle.charge is not None:
            handle.charge.free()
            handle.charge = None

    def _to_disk_impl(self, handle: PythonHandle, directory: str) -> None:
        obj = handle.obj
        if type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray" and obj.dtype != object:
            import numpy as np
            path = model_file(directory, handle.name, ".npy")
            digest = atomic_write(path, lambda f: np.save(f, obj, allow_pickle=False))
            fmt = "npy"
        else:
            path = model_file(directory, handle.name, ".pkl")
            digest = atomic_write(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
            fmt = "pickle"
        handle.disk_path, handle.sha256, handle.format = path, digest, fmt
        handle.obj = None

    def _from_disk_impl(self, handle: PythonHandle) -> None:
        assert handle.disk_path is not None
        data = read_verified(handle.disk_path, handle.sha256, model=handle.name)
        if handle.format == "npy":
            import numpy as np
            obj = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            obj = pickle.loads(data)
        remove_quietly(handle.disk_path)
        handle.obj, handle.disk_path, handle.host_bytes = obj, None, handle.nbytes

    def _release_impl(self, handle: PythonHandle) -> None:
        self._uncharge(handle)
        remove_quietly(handle.disk_path)
        on_device = handle.tier is Tier.DEVICE and _torch_kind(handle.obj) is not None
        handle.obj = None
        if on_device:
            _return_cached_cuda_memory()

    def _model_impl(self, handle: PythonHandle) -> Any:
        return handle.obj
