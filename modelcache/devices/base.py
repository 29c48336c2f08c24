"""The device interface, in two parts:

- :class:`DeviceMonitor`: memory *readings* (total, free, this process's use). A new memory signal
  is one subclass in its own module of this package.
- :class:`DeviceMemory`: memory *operations* a backend needs (allocate, free, host->device copies,
  synchronize, measuring what a runtime took, a thread for a runtime's calls). One implementation
  per kind of device: CUDA (``cuda.py``) and simulated (``simulated.py``). Backends call this
  interface and never ask which kind of device they run on.

A monitor gives its device's operations as :attr:`DeviceMonitor.memory`.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

from .host import HostPool

T = TypeVar("T")


@dataclass(frozen=True)
class MemoryReading:
    """One reading of a device's memory, in bytes. ``process_bytes`` is this process's use,
    or None where the signal cannot attribute memory to processes."""

    total_bytes: int
    free_bytes: int
    used_bytes: int
    process_bytes: Optional[int]


class DeviceMonitor(ABC):
    """Reads a device's memory. Must be thread-safe; ``free_bytes`` is called on every planned load."""

    #: True for :class:`SimulatedDevice` (for tools that report what they ran on; backends never read it)
    simulated: bool = False
    device: int = 0
    name: str = "device"

    @abstractmethod
    def total_bytes(self) -> int:
        """Total memory of the device."""

    @abstractmethod
    def free_bytes(self) -> int:
        """Memory free on the device right now, whoever else uses it."""

    def used_bytes(self) -> int:
        """Memory in use on the device by every process."""
        return self.total_bytes() - self.free_bytes()

    def process_bytes(self, pid: Optional[int] = None) -> Optional[int]:
        """Memory used by process ``pid`` (None: this process), or None if unknown."""
        return None

    def reading(self) -> MemoryReading:
        total, free = self.total_bytes(), self.free_bytes()
        return MemoryReading(total, free, total - free, self.process_bytes())

    @property
    def memory(self) -> "DeviceMemory":
        """Memory operations on this device: CUDA through cuda-python unless the monitor is a
        simulated device (made on first use; cuda-python is imported only when an operation runs)."""
        memory: Optional[DeviceMemory] = self.__dict__.get("_memory")
        if memory is None:
            from .cuda import CudaMemory
            memory = self.__dict__.setdefault("_memory", CudaMemory(self))
        return memory

    def close(self) -> None:
        """Release what the monitor holds (NVML handles, streams)."""
        memory = self.__dict__.get("_memory")
        if memory is not None:
            memory.close()


class Buffer(ABC):
    """Device memory owned by the caller: ``ptr`` is its address in the device type runtimes see
    (:attr:`DeviceMemory.kind`), ``nbytes`` its size. :meth:`free` is idempotent."""

    ptr: int
    nbytes: int

    @abstractmethod
    def free(self) -> None:
        """Give the memory back; nothing may use it any more."""


class Charge:
    """Device bytes a runtime (a session, an engine, a torch module) holds, as accounted on the
    device: on a GPU the runtime's own allocations already show there and :meth:`free` does
    nothing; on a simulated device the bytes are booked and :meth:`free` returns them."""

    __slots__ = ("nbytes", "_release")

    def __init__(self, nbytes: int, release: Optional[Callable[[], None]] = None) -> None:
        self.nbytes = nbytes
        self._release = release

    def free(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __repr__(self) -> str:
        return f"Charge({self.nbytes} B)"


class Runner(ABC):
    """Runs a runtime's calls for one session or engine (see :meth:`DeviceMemory.new_runner`)."""

    @abstractmethod
    def submit(self, fn: Callable[..., T], *args: Any) -> "Future[T]": ...

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the runner; its result, or its exception raised here."""
        return self.submit(fn, *args).result()

    @abstractmethod
    def shutdown(self) -> None:
        """No further calls; calls already submitted still run."""


class InlineRunner(Runner):
    """Runs calls in the calling thread (where runtimes keep no per-thread device state)."""

    def submit(self, fn: Callable[..., T], *args: Any) -> "Future[T]":
        future: "Future[T]" = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # delivered through the Future, as an executor would
            future.set_exception(exc)
        return future

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def shutdown(self) -> None:
        pass


class ThreadRunner(Runner):
    """A thread of its own: runtimes that keep device state per calling thread (ONNX Runtime's
    CUDA provider keeps cuBLAS/cuDNN handles and workspaces for every thread that runs a
    session) keep it for this one thread only. A call is handed over through a queue and its
    caller woken by a lock: the cheapest hand-off between Python threads."""

    #: seconds a runner keeps polling for the next call before it blocks: a thread woken from a
    #: blocking wait runs the next launch-bound model up to 25 % slower (measured on the H100 host)
    SPIN_S = 0.003

    def __init__(self, label: str) -> None:
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"modelcache-{label}"[:40], daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        get, spin = self._queue.get, self.SPIN_S
        task = get()
        while task is not _STOP:
            task()
            task, until = None, time.perf_counter() + spin
            while task is None and time.perf_counter() < until:
                try:
                    task = self._queue.get_nowait()
                except queue.Empty:
                    time.sleep(0)          # let other threads run (and take the GIL)
            if task is None:
                task = get()

    def submit(self, fn: Callable[..., T], *args: Any) -> "Future[T]":
        future: "Future[T]" = Future()

        def task() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)
        self._queue.put(task)
        return future

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        done = threading.Lock()
        done.acquire()
        result: List[T] = []
        error: List[BaseException] = []

        def task() -> None:
            try:
                result.append(fn(*args))
            except BaseException as exc:
                error.append(exc)
            finally:
                done.release()
        self._queue.put(task)
        done.acquire()
        if error:
            raise error[0]
        return result[0]

    def shutdown(self) -> None:
        self._queue.put(_STOP)


_STOP = object()


class DeviceMemory(ABC):
    """Memory operations on one device, for backends. Thread-safe. Copies and synchronization
    act on the calling thread's own stream, so concurrent moves do not serialize."""

    #: the device type runtimes see for this memory: ``"cuda"``, or ``"cpu"`` for a simulated
    #: device (whose buffers are host memory, so runtimes can read them)
    kind: str = "cuda"
    #: the device's ordinal for runtimes
    index: int = 0
    #: what ``torch.Tensor.to`` takes for this device (``"cuda:0"``, or ``"cpu"``)
    torch_device: str = "cpu"
    #: device bytes a runtime session costs besides its weights, for planning before one was
    #: measured (0: unknown)
    session_overhead_bytes: int = 0

    #: planning figure for the working memory of one run (activations, workspaces) where none
    #: was measured
    run_overhead_bytes: int = 0
    #: device bytes a runtime keeps for each further thread that runs a session (handles and
    #: workspaces), for planning before one was measured
    thread_overhead_bytes: int = 0

    def __init__(self) -> None:
        self._working_lock = threading.Lock()
        self._working: Dict[Any, List[Any]] = {}      # key -> [runs in flight, bytes, booking]

    @contextlib.contextmanager
    def working(self, nbytes: int, key: Any, owner: str = "") -> Iterator[None]:
        """Count ``nbytes`` of runtime working memory (a run's activations and workspaces) while the
        block runs, once per ``key`` however many runs of it are in flight (runs of one runtime
        session take turns on its runner). A simulated device books it meanwhile (a full device
        raises :class:`DeviceOutOfMemoryError` naming ``owner``, the model that runs)."""
        self.begin_working(nbytes, key, owner)
        try:
            yield
        finally:
            self.end_working(key)

    def begin_working(self, nbytes: int, key: Any, owner: str = "") -> None:
        """:meth:`working` without a context manager (a run's hot path); end it with
        :meth:`end_working` of the same ``key``."""
        with self._working_lock:
            held = self._working.get(key)
            if held is None:
                booking = self._book_working(nbytes, owner)     # may raise DeviceOutOfMemoryError
                held = self._working[key] = [0, nbytes, booking]
            held[0] += 1

    def end_working(self, key: Any) -> None:
        with self._working_lock:
            held = self._working[key]
            held[0] -= 1
            if held[0] == 0:
                del self._working[key]
                if held[2] is not None:
                    held[2].free()

    def working_bytes(self) -> int:
        """Device bytes of working memory held by runs in flight (see :meth:`working`)."""
        with self._working_lock:
            return sum(held[1] for held in self._working.values())

    def _book_working(self, nbytes: int, owner: str) -> Any:
        """Book ``nbytes`` of working memory for a run of ``owner`` (None: the runtime's own
        allocation shows already)."""
        return None

    @abstractmethod
    def allocate(self, nbytes: int, owner: str = "") -> Buffer:
        """``nbytes`` of device memory (in the calling thread's stream order where supported).
        Raises :class:`DeviceOutOfMemoryError` when the device has no room."""

    @abstractmethod
    def charge(self, nbytes: int, owner: str = "") -> Charge:
        """Account for ``nbytes`` that a runtime allocates itself (see :class:`Charge`)."""

    @abstractmethod
    def measure(self, fn: Callable[[], T], *, expected_bytes: int, owner: str = "") -> Tuple[T, Charge]:
        """Run ``fn`` (which makes a runtime allocate device memory: a session, an engine) and
        return its result and a :class:`Charge` for what it took: on a GPU, this process's growth
        as the monitor reads it; on a simulated device, ``expected_bytes`` booked before ``fn``
        runs (so a full device fails as a GPU would)."""

    def has_arena(self) -> bool:
        """Whether this memory keeps runs' working memory in an arena of its own that
        :meth:`shrink_arena` gives back (a simulated device's; on a GPU the runtime's arena is
        shrunk through the runtime)."""
        return False

    def shrink_arena(self) -> None:
        """Give back what :meth:`has_arena`'s arena holds free (see ``SimulatedDevice(arena_keeps=)``)."""

    def measure_release(self, fn: Callable[[], T]) -> Tuple[T, Optional[int]]:
        """Run ``fn`` (which makes a runtime give memory back: an arena shrunk) and return its
        result and the device bytes the process got back (the monitor's reading before less
        after, other threads' moves included); None where it cannot be seen."""
        return fn(), None

    def measure_peak(self, fn: Callable[[], T], *, expected_bytes: int, owner: str = "") -> Tuple[T, Charge, int]:
        """:meth:`measure`, and how far the device's use rose above what stays while ``fn`` ran
        (bytes): a session's first run searches convolution algorithms with workspaces it gives
        back. A GPU samples its reading during ``fn``; a simulated device books its
        ``session_peak_bytes`` during ``fn``. 0 where it cannot be seen."""
        result, charge = self.measure(fn, expected_bytes=expected_bytes, owner=owner)
        return result, charge, 0

    @abstractmethod
    def copy_to_device(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        """Start copying ``nbytes`` from host address ``src_ptr`` to ``dst_ptr`` on the device."""

    @abstractmethod
    def copy_to_host(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        """Start copying ``nbytes`` from device address ``src_ptr`` to host address ``dst_ptr``."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for the calling thread's copies (and work queued on its stream) to finish."""

    def stream_handle(self) -> int:
        """The calling thread's stream, as an int for runtimes (0: the default stream)."""
        return 0

    def device_context(self) -> "contextlib.AbstractContextManager[None]":
        """A context manager: runtime work in the block (a run on the caller's thread) happens in
        the device's own context, and the caller's context is current again afterwards (pycuda's
        ``autoinit`` makes a context of its own). Nothing to do on a simulated device."""
        return contextlib.nullcontext()

    @abstractmethod
    def new_host_pool(self) -> HostPool:
        """A pool of host blocks fit for fast copies to this device (pinned on a GPU)."""

    @abstractmethod
    def new_runner(self, label: str) -> Runner:
        """Where one runtime session's calls run (see :class:`ThreadRunner`)."""

    def describe(self) -> Dict[str, Any]:
        """What compiled artefacts are tied to: ``cuda_version``, ``gpu_name`` and
        ``compute_capability`` (None where unknown, e.g. on a simulated device)."""
        return {"cuda_version": None, "gpu_name": None, "compute_capability": None}

    def close(self) -> None:
        """Release streams and other per-device resources."""
