"""A device that exists only in bookkeeping, for machines without a GPU (tests, CI, the demo).

Backends allocate on it instead of on a GPU (see ``DeviceMonitor.simulated``), and a test can
play "another process" with :meth:`SimulatedDevice.take` to create memory pressure.
"""
from __future__ import annotations

import itertools
import threading
from typing import Dict, Optional, Tuple

from ..errors import DeviceOutOfMemoryError
from ..sizes import Size, parse_size
from .base import DeviceMonitor


class SimulatedAllocation:
    """A block on a :class:`SimulatedDevice`; :meth:`free` gives it back (idempotent)."""

    __slots__ = ("_device", "_token", "nbytes", "owner")

    def __init__(self, device: "SimulatedDevice", token: int, nbytes: int, owner: str) -> None:
        self._device, self._token, self.nbytes, self.owner = device, token, nbytes, owner

    def free(self) -> None:
        self._device._free(self._token)

    def __repr__(self) -> str:
        return f"SimulatedAllocation({self.nbytes} B, owner={self.owner!r})"


class SimulatedDevice(DeviceMonitor):
    """A GPU of ``total`` bytes (int or ``"8GiB"``) in bookkeeping only. Thread-safe.

    Allocations beyond the free memory raise :class:`DeviceOutOfMemoryError`, as a real GPU
    would; ``oom_count`` counts them and ``peak_process_bytes`` records this process's peak.
    """

    simulated = True

    def __init__(self, total: Size = "16GiB", *, device: int = 0, name: str = "SimulatedDevice",
                 session_overhead: Size = 0, link_bytes_per_s: Optional[float] = None) -> None:
        self._total = parse_size(total, what="SimulatedDevice total")
        #: host->device bandwidth that :meth:`copy` takes time from (None: copies are free);
        #: concurrent copies share it equally, as copies over one PCIe link do
        self.link_bytes_per_s = link_bytes_per_s
        self._link = threading.Condition()
        self._copies: Dict[int, float] = {}     # copy id -> bytes still to move
        #: device bytes a runtime session costs besides its weights (ONNX Runtime's CUDA provider:
        #: about 200 MiB on an H100); backends allocate it for each device session they create
        self.session_overhead_bytes = parse_size(session_overhead, what="session_overhead")
        self.device = device
        self.name = name
        self._lock = threading.Lock()
        self._blocks: Dict[int, Tuple[int, bool, str]] = {}  # token -> (nbytes, external, owner)
        self._tokens = itertools.count(1)
        self._used = 0
        self._process = 0
        self.peak_process_bytes = 0
        self.oom_count = 0

    # readings -----------------------------------------------------------------------------
    def total_bytes(self) -> int:
        return self._total

    def free_bytes(self) -> int:
        return self._total - self._used

    def process_bytes(self, pid: Optional[int] = None) -> Optional[int]:
        return self._process if pid is None else None

    def external_bytes(self) -> int:
        """Memory held by simulated other processes."""
        with self._lock:
            return self._used - self._process

    # allocation ---------------------------------------------------------------------------
    def allocate(self, nbytes: int, owner: str = "", *, external: bool = False) -> SimulatedAllocation:
        """Take ``nbytes``; raises :class:`DeviceOutOfMemoryError` if fewer are free."""
        if nbytes < 0:
            raise ValueError(f"nbytes={nbytes} must be >= 0")
        with self._lock:
            if nbytes > self._total - self._used:
                self.oom_count += 1
                raise DeviceOutOfMemoryError(
                    f"out of memory on {self.name}: asked for {nbytes} B with "
                    f"{self._total - self._used} B free of {self._total} B",
                    model=owner or None)
            token = next(self._tokens)
            self._blocks[token] = (nbytes, external, owner)
            self._used += nbytes
            if not external:
                self._process += nbytes
                self.peak_process_bytes = max(self.peak_process_bytes, self._process)
        return SimulatedAllocation(self, token, nbytes, owner)

    def copy(self, nbytes: int) -> None:
        """Take as long as moving ``nbytes`` over the link shared with the copies in flight
        (processor sharing, re-evaluated every millisecond). Returns at once without a link."""
        if not self.link_bytes_per_s or nbytes <= 0:
            return
        import time
        with self._link:
            key = next(self._tokens)
            self._copies[key] = float(nbytes)
        last = time.perf_counter()
        try:
            while True:
                with self._link:
                    now = time.perf_counter()
                    share = self.link_bytes_per_s / max(len(self._copies), 1)
                    self._copies[key] -= share * (now - last)
                    last = now
                    left = self._copies[key]
                    if left <= 0:
                        return
                time.sleep(min(left / share, 0.001))
        finally:
            with self._link:
                self._copies.pop(key, None)

    def take(self, nbytes: Size, owner: str = "other-process") -> SimulatedAllocation:
        """Simulate another process taking memory (pressure); free it with ``.free()``."""
        return self.allocate(parse_size(nbytes, total=self._total, what="nbytes"), owner, external=True)

    def _free(self, token: int) -> None:
        with self._lock:
            block = self._blocks.pop(token, None)
            if block is None:
                return
            nbytes, external, _ = block
            self._used -= nbytes
            if not external:
                self._process -= nbytes

    def allocations(self) -> Dict[str, int]:
        """Bytes held per owner."""
        with self._lock:
            out: Dict[str, int] = {}
            for nbytes, _, owner in self._blocks.values():
                out[owner] = out.get(owner, 0) + nbytes
            return out

    def __repr__(self) -> str:
        return f"SimulatedDevice(total={self._total}, used={self._used})"
