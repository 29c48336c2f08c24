"""A device that exists only in bookkeeping, for machines without a GPU (tests, CI, the demo).

Its :class:`DeviceMemory` charges what a GPU would: buffers are real host memory (so runtimes
read what was copied into them, and a copy that goes wrong shows), every allocation, runtime
session and engine is booked against the device's total (a full device raises
:class:`DeviceOutOfMemoryError`), and copies take time on a simulated link shared by the copies in
flight. A test can play "another process" with :meth:`SimulatedDevice.take`.
"""
from __future__ import annotations

import ctypes
import itertools
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import numpy as np

from ..errors import DeviceOutOfMemoryError
from ..sizes import Size, parse_size
from .base import Buffer, Charge, DeviceMemory, DeviceMonitor, InlineRunner, Runner
from .host import HostPool, aligned_empty

T = TypeVar("T")


class SimulatedAllocation:
    """A block on a :class:`SimulatedDevice`; :meth:`free` gives it back (idempotent)."""

    __slots__ = ("_device", "_token", "nbytes", "owner")

    def __init__(self, device: "SimulatedDevice", token: int, nbytes: int, owner: str) -> None:
        self._device, self._token, self.nbytes, self.owner = device, token, nbytes, owner

    def free(self) -> None:
        self._device._free(self._token)

    def shrink(self, nbytes: int) -> None:
        """Give back all but ``nbytes`` of the block, in place (no moment without it)."""
        self._device._shrink(self._token, nbytes)
        self.nbytes = min(self.nbytes, nbytes)

    def __repr__(self) -> str:
        return f"SimulatedAllocation({self.nbytes} B, owner={self.owner!r})"


class SimulatedDevice(DeviceMonitor):
    """A GPU of ``total`` bytes (int or ``"8GiB"``) in bookkeeping only. Thread-safe.

    Allocations beyond the free memory raise :class:`DeviceOutOfMemoryError`, as a real GPU
    would; ``oom_count`` counts them and ``peak_process_bytes`` records this process's peak.
    """

    simulated = True

    def __init__(self, total: Size = "16GiB", *, device: int = 0, name: str = "SimulatedDevice",
                 session_overhead: Size = 0, link_bytes_per_s: Optional[float] = None,
                 run_overhead: Size = 0, thread_overhead: Size = 0, session_peak: Size = 0,
                 arena_keeps: Optional[float] = None) -> None:
        self._total = parse_size(total, what="SimulatedDevice total")
        #: host->device bandwidth that :meth:`copy` takes time from (None: copies are free);
        #: concurrent copies share it equally, as copies over one PCIe link do
        self.link_bytes_per_s = link_bytes_per_s
        self._link = threading.Condition()
        self._copies: Dict[int, float] = {}     # copy id -> bytes still to move
        #: device bytes a runtime session costs besides its weights (ONNX Runtime's CUDA provider:
        #: about 200 MiB on an H100); backends allocate it for each device session they create
        self.session_overhead_bytes = parse_size(session_overhead, what="session_overhead")
        #: device bytes a run takes while it runs (activations, workspaces)
        self.run_overhead_bytes = parse_size(run_overhead, what="run_overhead")
        #: device bytes a runtime keeps for each further thread that runs a session
        self.thread_overhead_bytes = parse_size(thread_overhead, what="thread_overhead")
        #: device bytes a session's creation takes briefly beyond what it keeps (on a GPU its
        #: warm-up run's working memory and convolution-algorithm search)
        self.session_peak_bytes = parse_size(session_peak, what="session_peak")
        if arena_keeps is not None and not 0.0 <= arena_keeps <= 1.0:
            raise ValueError(f"arena_keeps={arena_keeps!r}; use a fraction from 0.0 to 1.0, or None")
        #: None: a run's working memory goes back to the device when the run ends. A fraction: it
        #: stays in an arena, as in ONNX Runtime's CUDA arena, for later runs, until the arena is
        #: shrunk (``DeviceMemory.shrink_arena``), which gives back all but this share of what the
        #: arena holds free (on a GPU, regions that other allocations hold)
        self.arena_keeps = arena_keeps
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

    def _shrink(self, token: int, nbytes: int) -> None:
        with self._lock:
            block = self._blocks.get(token)
            if block is None or nbytes >= block[0]:
                return
            held, external, owner = block
            self._blocks[token] = (max(0, nbytes), external, owner)
            self._used -= held - max(0, nbytes)
            if not external:
                self._process -= held - max(0, nbytes)

    def allocations(self) -> Dict[str, int]:
        """Bytes held per owner."""
        with self._lock:
            out: Dict[str, int] = {}
            for nbytes, _, owner in self._blocks.values():
                out[owner] = out.get(owner, 0) + nbytes
            return out

    @property
    def memory(self) -> "SimulatedMemory":
        memory: Optional[SimulatedMemory] = self.__dict__.get("_memory")
        if memory is None:
            memory = self.__dict__.setdefault("_memory", SimulatedMemory(self))
        return memory

    def __repr__(self) -> str:
        return f"SimulatedDevice(total={self._total}, used={self._used})"


class SimulatedBuffer(Buffer):
    """A buffer on a :class:`SimulatedDevice`: host memory, booked on the device."""

    __slots__ = ("ptr", "nbytes", "array", "_booking")

    def __init__(self, booking: SimulatedAllocation, nbytes: int) -> None:
        self.array: Optional[np.ndarray] = aligned_empty(max(nbytes, 1))     # as cudaMalloc's
        self.ptr, self.nbytes, self._booking = int(self.array.ctypes.data), nbytes, booking

    def free(self) -> None:
        self._booking.free()
        self.array, self.ptr = None, 0


class SimulatedMemory(DeviceMemory):
    """:class:`DeviceMemory` on a :class:`SimulatedDevice`; runtimes see its buffers as host
    (``"cpu"``) memory. See the module docstring."""

    kind = "cpu"
    torch_device = "cpu"

    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__()
        self.device = device
        self.index = 0
        self._arena = _Arena(device) if device.arena_keeps is not None else None


    def allocate(self, nbytes: int, owner: str = "") -> SimulatedBuffer:
        return SimulatedBuffer(self.device.allocate(nbytes, owner=owner), nbytes)

    def charge(self, nbytes: int, owner: str = "") -> Charge:
        return Charge(nbytes, self.device.allocate(nbytes, owner=owner).free)

    def measure(self, fn: Callable[[], T], *, expected_bytes: int, owner: str = "") -> Tuple[T, Charge]:
        charge = self.charge(expected_bytes, owner)
        try:
            return fn(), charge
        except BaseException:
            charge.free()
            raise

    def measure_peak(self, fn: Callable[[], T], *, expected_bytes: int, owner: str = "") -> Tuple[T, Charge, int]:
        peak = self.device.session_peak_bytes
        extra = self.charge(peak, owner)        # booked while fn runs, as a GPU's search takes it
        try:
            result, charge = self.measure(fn, expected_bytes=expected_bytes, owner=owner)
        finally:
            extra.free()
        return result, charge, peak

    def copy_to_device(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        self.device.copy(nbytes)
        ctypes.memmove(dst_ptr, src_ptr, nbytes)

    def copy_to_host(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        ctypes.memmove(dst_ptr, src_ptr, nbytes)

    def synchronize(self) -> None:
        pass

    def new_host_pool(self) -> HostPool:
        return HostPool()

    def new_runner(self, label: str) -> Runner:
        return InlineRunner()

    @property
    def session_overhead_bytes(self) -> int:
        return self.device.session_overhead_bytes

    @session_overhead_bytes.setter
    def session_overhead_bytes(self, nbytes: int) -> None:
        self.device.session_overhead_bytes = nbytes

    @property
    def run_overhead_bytes(self) -> int:
        return self.device.run_overhead_bytes

    @run_overhead_bytes.setter
    def run_overhead_bytes(self, nbytes: int) -> None:
        self.device.run_overhead_bytes = nbytes

    @property
    def thread_overhead_bytes(self) -> int:
        return self.device.thread_overhead_bytes

    @thread_overhead_bytes.setter
    def thread_overhead_bytes(self, nbytes: int) -> None:
        self.device.thread_overhead_bytes = nbytes

    def _book_working(self, nbytes: int, owner: str) -> Any:
        try:
            if self._arena is not None:
                return self._arena.take(nbytes)
            return self.device.allocate(nbytes, owner="working memory")
        except DeviceOutOfMemoryError as exc:    # named after the model whose run needed it
            raise DeviceOutOfMemoryError(f"{exc.reason} (a run's working memory)", model=owner or None) from None

    def has_arena(self) -> bool:
        return self._arena is not None

    def shrink_arena(self) -> None:
        if self._arena is not None:
            self._arena.shrink(self.device.arena_keeps or 0.0)

    def measure_release(self, fn: Callable[[], T]) -> Tuple[T, Optional[int]]:
        before = self.device.process_bytes() or 0
        result = fn()
        return result, max(0, before - (self.device.process_bytes() or 0))


class _Arena:
    """Working memory of runs kept after they end for later runs (SimulatedDevice(arena_keeps=)):
    device bytes held as one booking, of which ``free`` bytes no run uses now."""

    def __init__(self, device: SimulatedDevice) -> None:
        self._device = device
        self._lock = threading.Lock()
        self._bookings: List[SimulatedAllocation] = []
        self.held = 0
        self.free = 0

    def take(self, nbytes: int) -> "_ArenaBlock":
        with self._lock:
            grow = max(0, nbytes - self.free)
            if grow:        # may raise DeviceOutOfMemoryError, as the arena's extension would
                self._bookings.append(self._device.allocate(grow, owner="arena"))
                self.held += grow
                self.free += grow
            self.free -= nbytes
        return _ArenaBlock(self, nbytes)

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.free += nbytes

    def shrink(self, keeps: float) -> None:
        with self._lock:
            release = int(self.free * (1.0 - keeps))
            self.held -= release
            self.free -= release
            kept = []
            for booking in self._bookings:     # each given back in place: none of it is ever unbooked
                take = min(release, booking.nbytes)
                release -= take
                if take == booking.nbytes:
                    booking.free()
                else:
                    booking.shrink(booking.nbytes - take)
                    kept.append(booking)
            self._bookings = kept


class _ArenaBlock:
    """A run's working memory taken from the arena; :meth:`free` gives it back to the arena."""

    __slots__ = ("_arena", "nbytes")

    def __init__(self, arena: _Arena, nbytes: int) -> None:
        self._arena: Optional[_Arena] = arena
        self.nbytes = nbytes

    def free(self) -> None:
        arena, self._arena = self._arena, None
        if arena is not None:
            arena.give(self.nbytes)
