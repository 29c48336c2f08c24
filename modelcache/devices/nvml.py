"""Real GPU memory through NVML (package ``nvidia-ml-py``, imported lazily)."""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, Optional

from cachetools import TTLCache

from ..errors import MonitorError
from .base import DeviceMonitor

_init_lock = threading.Lock()
_init_count = 0


def _nvml() -> Any:
    """Import pynvml and initialise NVML once per process (reference counted)."""
    global _init_count
    try:
        import pynvml
    except ImportError as exc:
        raise MonitorError("NVML is unavailable: the package nvidia-ml-py is not installed "
                           "(pip install 'modelcache[nvml]')") from exc
    with _init_lock:
        if _init_count == 0:
            try:
                pynvml.nvmlInit()
            except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded...
                raise MonitorError(f"NVML is unavailable: {exc} (no NVIDIA driver or GPU on this machine?)") from exc
        _init_count += 1
    return pynvml


def _release() -> None:
    global _init_count
    import pynvml
    with _init_lock:
        _init_count -= 1
        if _init_count == 0:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass


def _nvml_handle(pynvml: Any, device: int) -> Any:
    """CUDA ordinal -> NVML handle, honouring CUDA_VISIBLE_DEVICES (indices or UUIDs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() != "":
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if not 0 <= device < len(ids):
            raise MonitorError(f"device={device} is out of range: CUDA_VISIBLE_DEVICES={visible!r} "
                               f"makes devices 0..{len(ids) - 1} visible")
        ident = ids[device]
        if ident.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(ident))
        return pynvml.nvmlDeviceGetHandleByUUID(ident)
    count = pynvml.nvmlDeviceGetCount()
    if not 0 <= device < count:
        raise MonitorError(f"device={device} is out of range: NVML sees {count} GPU(s), 0..{count - 1}")
    return pynvml.nvmlDeviceGetHandleByIndex(device)


class NvmlMonitor(DeviceMonitor):
    """Device-wide and per-process memory of one GPU, in bytes.

    Free memory counts every process's use, so other processes' growth shows up as pressure.
    ``device`` is a CUDA ordinal (None: 0, or the process's current device when torch has one),
    mapped through ``CUDA_VISIBLE_DEVICES``. Per-process figures need the driver to report this
    process's PID (in containers with their own PID namespace it may not: then 0 is read).
    """

    def __init__(self, device: Optional[int] = None) -> None:
        self.device = _current_device() if device is None else int(device)
        self._pynvml = _nvml()
        from .cuda import small_cublas_workspaces
        small_cublas_workspaces()       # before the process's first cuBLAS use, if it has not come yet
        try:
            self._handle = _nvml_handle(self._pynvml, self.device)
            name = self._pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self._total = int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        except MonitorError:
            _release()
            raise
        except Exception as exc:
            _release()
            raise MonitorError(f"NVML could not open device {self.device}: {exc}") from exc
        self._procs: TTLCache[str, Dict[int, int]] = TTLCache(maxsize=1, ttl=0.05)  # the process list is slow to query
        self._procs_lock = threading.Lock()
        self._closed = False

    def total_bytes(self) -> int:
        return self._total

    def free_bytes(self) -> int:
        """Free memory on the device, counting as free what this process freed and is giving back
        to the driver right now (``devices.cuda.Releaser``: read after NVML, so a release that
        ends in between is counted once at most)."""
        try:
            free = int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).free)
        except Exception as exc:
            raise MonitorError(f"NVML could not read device {self.device}: {exc}") from exc
        releaser = self._releaser()
        return free + releaser.pending_bytes if releaser is not None else free

    def _releaser(self) -> Any:
        memory = self.__dict__.get("_memory")
        return getattr(memory, "releaser", None)

    def processes(self, fresh: bool = False) -> Dict[int, int]:
        """Bytes used per PID by compute processes on this GPU (a reading up to 50 ms old unless
        ``fresh``: the query is slow, and status displays poll it)."""
        with self._procs_lock:
            cached = None if fresh else self._procs.get("procs")
            if cached is not None:
                return dict(cached)
            try:
                procs = self._pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
            except Exception as exc:
                raise MonitorError(f"NVML could not list processes on device {self.device}: {exc}") from exc
            table: Dict[int, int] = {}
            for p in procs:
                table[int(p.pid)] = table.get(int(p.pid), 0) + int(p.usedGpuMemory or 0)
            self._procs["procs"] = table
            return dict(table)

    def process_bytes(self, pid: Optional[int] = None) -> Optional[int]:
        """A fresh reading: backends measure allocations with it. Frees of this process still
        being given back to the driver are waited for first."""
        releaser = self._releaser()
        if releaser is not None and releaser.pending_bytes:
            releaser.flush()
        return self.processes(fresh=True).get(os.getpid() if pid is None else pid, 0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            super().close()
            _release()

    def __repr__(self) -> str:
        return f"NvmlMonitor(device={self.device}, name={self.name!r})"


def _current_device() -> int:
    """The current CUDA device where a framework already chose one, else 0."""
    import sys
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.current_device())
    except Exception:
        pass
    return 0
