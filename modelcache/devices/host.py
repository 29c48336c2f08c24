"""Host memory: readings through psutil, and pools of reusable host blocks.

:class:`HostPool` gives plain (pageable) numpy blocks; ``cuda.PinnedPool`` gives page-locked ones
with the same interface, so backends have one code path (see ``DeviceMemory.new_host_pool``).
"""
from __future__ import annotations

import os
import threading
from typing import Any, List, Optional

import numpy as np
import psutil

_ALIGN = 256


def align(nbytes: int, alignment: int = _ALIGN) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    return (nbytes + alignment - 1) // alignment * alignment


def aligned_empty(nbytes: int, alignment: int = _ALIGN) -> np.ndarray:
    """An uninitialized uint8 array of ``nbytes`` starting at a multiple of ``alignment`` bytes,
    as cudaMalloc's and cudaHostAlloc's memory does. numpy's own start at 16 bytes, and ONNX
    Runtime's CPU kernels read weights from such memory slower (convolutions of a ResNet-like
    builder: 1.13-1.14 x a plain session's run, 1.01-1.02 x from 256-byte aligned memory)."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes]


class HostMonitor:
    """Host memory readings in bytes. ``available_bytes`` is what can be allocated without swapping."""

    def total_bytes(self) -> int:
        return int(psutil.virtual_memory().total)

    def available_bytes(self) -> int:
        return int(psutil.virtual_memory().available)

    def process_bytes(self, pid: Optional[int] = None) -> int:
        """Resident set size of ``pid`` (None: this process)."""
        return int(psutil.Process(pid or os.getpid()).memory_info().rss)


class HostBlock:
    """A block of host memory; ``array`` is a uint8 numpy view of it, ``ptr`` its address."""

    __slots__ = ("ptr", "nbytes", "array", "pinned", "_owner")

    def __init__(self, ptr: int, nbytes: int, array: np.ndarray, pinned: bool, owner: Any = None) -> None:
        self.ptr, self.nbytes, self.array, self.pinned, self._owner = ptr, nbytes, array, pinned, owner

    def view(self, offset: int, nbytes: int, dtype: Any, shape: Any) -> np.ndarray:
        view: np.ndarray = self.array[offset:offset + nbytes].view(dtype).reshape(shape)
        return view


class HostPool:
    """Reusable host blocks. The base class gives pageable numpy blocks (machines without CUDA);
    ``cuda.PinnedPool`` gives page-locked ones. Freed blocks are kept (up to ``max_idle_bytes``)
    and handed out again to requests they fit (best fit). Thread-safe."""

    pinned = False

    def __init__(self, max_idle_bytes: int = 4 << 30) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._free: List[HostBlock] = []
        self._lock = threading.Lock()
        self.allocated_bytes = 0      #: bytes allocated from the system and not yet returned
        self.allocations = 0          #: system allocations made (a low count means reuse works)

    def get(self, nbytes: int) -> HostBlock:
        want = align(max(nbytes, 1))
        with self._lock:
            fits = [b for b in self._free if want <= b.nbytes <= 2 * want]
            if fits:
                block = min(fits, key=lambda b: b.nbytes)
                self._free.remove(block)
                return block
        block = self._allocate(want)
        with self._lock:
            self.allocated_bytes += block.nbytes
            self.allocations += 1
        return block

    def put(self, block: HostBlock) -> None:
        with self._lock:
            self._free.append(block)
            idle = sum(b.nbytes for b in self._free)
            while idle > self.max_idle_bytes and self._free:
                oldest = self._free.pop(0)
                idle -= oldest.nbytes
                self.allocated_bytes -= oldest.nbytes
                self._release(oldest)

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._free)

    def close(self) -> None:
        with self._lock:
            blocks, self._free = self._free, []
            for block in blocks:
                self.allocated_bytes -= block.nbytes
                self._release(block)

    def _allocate(self, nbytes: int) -> HostBlock:
        array = aligned_empty(nbytes)
        return HostBlock(array.ctypes.data, nbytes, array, pinned=False)

    def _release(self, block: HostBlock) -> None:
        block.array = None  # type: ignore[assignment]
