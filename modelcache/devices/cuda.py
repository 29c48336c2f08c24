"""The CUDA implementation of :class:`DeviceMemory`, through cuda-python (``cuda-bindings``),
imported lazily.

Pinned host blocks (pooled: pinning runs at ~2 GB/s, so blocks are reused), device buffers and
asynchronous copies on a stream per thread. Everything uses the CUDA runtime API and therefore the
device's primary context, which ONNX Runtime, torch and ``pycuda.autoprimaryctx`` share: pointers
from any of them can be mixed.

A thread may have another context current: ``pycuda.autoinit`` (and TensorRT samples built on it)
make a context of their own with ``Device.make_context()``. Work modelcache does on such a thread
switches to the primary context and gives the thread its own context back afterwards
(:func:`in_primary_context`), so the service's pycuda calls keep working. Device buffers of that
other context can be bound as inputs: on the H100 (driver 580) runs in the primary context read
them correctly (tests/devices/test_gpu_pycuda.py checks it).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, cast

import numpy as np

from ..errors import DeviceOutOfMemoryError, ModelCacheError
from .base import Buffer, Charge, DeviceMemory, Runner, ThreadRunner
from .host import HostBlock, HostPool

T = TypeVar("T")

def runtime() -> Any:
    """The ``cuda.bindings.runtime`` module (``cuda.cudart`` on older cuda-python)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt
        except ImportError as exc:
            raise ModelCacheError("CUDA memory work needs cuda-python: pip install 'modelcache[cuda]'") from exc
    return rt


def check(result: Any, what: str, nbytes: Optional[int] = None) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; raise a typed error unless it succeeded."""
    rt = runtime()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        message = f"{what} failed: {name.decode() if isinstance(name, bytes) else name}"
        if err == rt.cudaError_t.cudaErrorMemoryAllocation:
            raise DeviceOutOfMemoryError(f"{message} (asked for {nbytes} B)")
        raise ModelCacheError(message)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def set_device(device: int) -> None:
    """Make ``device``'s primary context current on the calling thread (replacing the context
    that was current: see :func:`in_primary_context` to keep a caller's)."""
    rt = runtime()
    check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")


def driver() -> Any:
    """The ``cuda.bindings.driver`` module (``cuda.cuda`` on older cuda-python)."""
    try:
        from cuda.bindings import driver as drv
    except ImportError:
        try:
            from cuda import cuda as drv
        except ImportError as exc:
            raise ModelCacheError("CUDA memory work needs cuda-python: pip install 'modelcache[cuda]'") from exc
    return drv


def check_driver(result: Any, what: str) -> Any:
    """Unpack a cuda-python driver-API ``(err, *values)`` result; raise unless it succeeded."""
    drv = driver()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        raise ModelCacheError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


#: device -> (primary context's handle, the context, the driver module, its success code)
_primary_contexts: Dict[int, Tuple[int, Any, Any, Any]] = {}
_primary_lock = threading.Lock()


def _primary(device: int) -> Tuple[int, Any, Any, Any]:
    entry = _primary_contexts.get(device)
    if entry is None:
        with _primary_lock:
            entry = _primary_contexts.get(device)
            if entry is None:
                drv = driver()
                check_driver(drv.cuInit(0), "cuInit")
                dev = check_driver(drv.cuDeviceGet(device), f"cuDeviceGet({device})")
                ctx = check_driver(drv.cuDevicePrimaryCtxRetain(dev), f"cuDevicePrimaryCtxRetain({device})")
                entry = _primary_contexts[device] = (as_int(ctx), ctx, drv, drv.CUresult.CUDA_SUCCESS)
    return entry


def primary_context(device: int) -> int:
    """The handle of ``device``'s primary context (the runtime API's, shared with ONNX Runtime
    and torch). Retained once for the life of the process, as the runtime itself keeps it."""
    return _primary(device)[0]


class in_primary_context:  # noqa: N801 - used like the function it was
    """Run the block in ``device``'s primary context. If the calling thread had another context
    current (``pycuda.autoinit``'s, or a primary context of another device), it is current
    again afterwards, whatever the block did; a thread with no context, or with this one, costs
    one ``cuCtxGetCurrent`` (about a microsecond). A class, not a generator: it is entered on
    every run of a model on a caller's thread."""

    __slots__ = ("device", "_saved")

    def __init__(self, device: int) -> None:
        self.device = device
        self._saved: Any = None

    def __enter__(self) -> None:
        # the hot path of a run on a caller thread: one driver call, the rest from module caches
        entry = _primary_contexts.get(self.device) or _primary(self.device)
        err, saved = entry[2].cuCtxGetCurrent()
        if err != entry[3]:
            check_driver((err,), "cuCtxGetCurrent")
        handle = int(saved) if saved is not None else 0
        if not handle or handle == entry[0]:
            return
        ctx, drv = entry[1], entry[2]
        # the driver API, not cudaSetDevice: the runtime skips the switch when it believes the
        # thread is on this device already, leaving the caller's context current for our work
        check_driver(drv.cuCtxSetCurrent(ctx), f"cuCtxSetCurrent(primary context of device {self.device})")
        self._saved = saved

    def __exit__(self, *exc: Any) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            check_driver(driver().cuCtxSetCurrent(saved), "cuCtxSetCurrent (giving the caller its context back)")


F = TypeVar("F", bound=Callable[..., Any])


def _keeps_caller_context(method: F) -> F:
    """Decorate a method of an object with a ``device`` attribute: it runs through
    :func:`in_primary_context`."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with in_primary_context(self.device):
            return method(self, *args, **kwargs)
    return cast(F, wrapper)


def as_int(value: Any) -> int:
    """An address or handle as an int. cuda-python handles (``cudaStream_t``...) convert with
    ``int()``; their ``getPtr()`` is the address of the handle's storage, not the handle."""
    return int(value)


_ptr = as_int


class PinnedPool(HostPool):
    """Page-locked host blocks from ``cudaMallocHost``, pooled."""

    pinned = True

    def _allocate(self, nbytes: int) -> HostBlock:
        rt = runtime()
        ptr = _ptr(check(rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})", nbytes))
        array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
        return HostBlock(ptr, nbytes, array, pinned=True)

    def _release(self, block: HostBlock) -> None:
        block.array = None  # type: ignore[assignment]
        check(runtime().cudaFreeHost(block.ptr), "cudaFreeHost")


_pools_supported: Dict[int, bool] = {}


def stream_ordered(device: int) -> bool:
    """Whether buffers on ``device`` come from the stream-ordered allocator (``cudaMallocAsync``
    on the device's default pool). Its frees do not synchronize the device, so an eviction
    does not wait for other models' copies and runs in flight; with the pool's default release
    threshold (0) the memory goes back to the driver at the stream's next synchronize, where
    NVML sees it. Off with ``MODELCACHE_STREAM_ORDERED_ALLOC=0`` or where pools are unsupported."""
    if os.environ.get("MODELCACHE_STREAM_ORDERED_ALLOC", "1") == "0":
        return False
    if device not in _pools_supported:
        rt = runtime()
        try:
            value = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrMemoryPoolsSupported, device),
                          "cudaDeviceGetAttribute(MemoryPoolsSupported)")
            _pools_supported[device] = bool(value) and hasattr(rt, "cudaMallocAsync")
        except (ModelCacheError, AttributeError):
            _pools_supported[device] = False
    return _pools_supported[device]


class DeviceBuffer(Buffer):
    """``nbytes`` of device memory; :meth:`free` is idempotent. With a ``stream`` (and pools
    supported, see :func:`stream_ordered`) it is allocated and freed in that stream's order,
    else with ``cudaMalloc``/``cudaFree`` (which synchronizes the device). With ``streams``, a
    free without a stream uses the freeing thread's stream from that pool, and with a
    ``releaser`` the memory goes back to the driver off the freeing thread (:class:`Releaser`)."""

    __slots__ = ("ptr", "nbytes", "device", "ordered", "_streams", "_releaser")

    def __init__(self, nbytes: int, device: int, stream: Optional["Stream"] = None,
                 streams: Optional["StreamPool"] = None, releaser: Optional["Releaser"] = None) -> None:
        self._streams, self._releaser = streams, releaser
        self.device = device
        with in_primary_context(device):
            self._allocate(nbytes, device, stream)

    def _allocate(self, nbytes: int, device: int, stream: Optional["Stream"]) -> None:
        set_device(device)
        rt = runtime()
        self.ordered = stream is not None and stream_ordered(device)
        if self.ordered:
            assert stream is not None
            self.ptr = _ptr(check(rt.cudaMallocAsync(max(nbytes, 1), stream.handle),
                                  f"cudaMallocAsync({nbytes})", nbytes))
        else:
            self.ptr = _ptr(check(rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})", nbytes))
        self.nbytes, self.device = nbytes, device

    @_keeps_caller_context
    def free(self, stream: Optional["Stream"] = None) -> None:
        """Free the buffer; its contents must no longer be in use by any stream. A stream-ordered
        buffer is freed in the order of ``stream`` (default: the freeing thread's), which is then
        synchronized: here when ``stream`` is given or there is no releaser (the memory is back with
        the driver on return), else by the releaser's thread (see :class:`Releaser`)."""
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            rt = runtime()
            deferred = stream is None and self._releaser is not None
            if stream is None and self.ordered and self._streams is not None:
                stream = self._streams.get(self.device)
            if self.ordered and stream is not None:
                check(rt.cudaFreeAsync(ptr, stream.handle), "cudaFreeAsync")
                if deferred:
                    assert self._releaser is not None
                    self._releaser.release(stream, self.nbytes)
                else:
                    stream.synchronize()
            else:
                check(rt.cudaFree(ptr), "cudaFree")


class Releaser:
    """Gives freed stream-ordered memory back to the driver off the freeing thread.

    A stream-ordered free returns the memory to the device's pool; with the pool's release
    threshold (0) the driver gets it back at the stream's next synchronize, which for 1.2 GiB
    takes about 2.5 ms on the H100 (unmapping). Doing that here would make an eviction wait for
    it; a thread of this releaser synchronizes the stream instead. Meanwhile the bytes are
    ``pending_bytes``: :class:`NvmlMonitor` adds them to its free reading and waits for them
    (:meth:`flush`) before a per-process reading and before the next allocation
    (:meth:`CudaMemory.allocate`), so readings and measurements see the memory freed and the device
    never holds an evicted model's memory and its successor's at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: "List[Tuple[Stream, int]]" = []
        self._pending = 0
        self.freed_total = 0            # bytes handed to release() so far (see CudaMemory.measure_release)
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    @property
    def pending_bytes(self) -> int:
        """Bytes freed whose release to the driver has not finished yet."""
        return self._pending

    def release(self, stream: "Stream", nbytes: int) -> None:
        """Synchronize ``stream`` (whose order holds a free of ``nbytes``) on the releaser's thread."""
        with self._cond:
            if not self._closed:
                self._queue.append((stream, nbytes))
                self._pending += nbytes
                self.freed_total += nbytes
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="modelcache-releaser", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
                return
        stream.synchronize()            # closed: on the freeing thread

    def flush(self, timeout: Optional[float] = 10.0) -> bool:
        """Wait until every release queued so far has finished; False if ``timeout`` passed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return
                stream, nbytes = self._queue.pop(0)
            try:
                with in_primary_context(stream.device):
                    set_device(stream.device)
                    stream.synchronize()
            except Exception:      # pragma: no cover - a broken device: the next synchronize reports it
                pass
            finally:
                with self._cond:
                    self._pending -= nbytes
                    self._cond.notify_all()

    def close(self) -> None:
        """Finish the queued releases; later frees synchronize on the freeing thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10.0)


class Stream:
    """A non-blocking CUDA stream for copies on one device; destroyed by :meth:`close` or when
    the stream is collected (a thread's stream goes with its thread, see :class:`StreamPool`)."""

    def __init__(self, device: int) -> None:
        rt = runtime()
        self.device = device
        with in_primary_context(device):
            set_device(device)
            self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._finalizer = weakref.finalize(self, _destroy_stream, self.handle, device)

    @_keeps_caller_context
    def copy_to_device(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        rt = runtime()
        check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle),
              "cudaMemcpyAsync(host to device)")

    @_keeps_caller_context
    def copy_to_host(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        rt = runtime()
        check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle),
              "cudaMemcpyAsync(device to host)")

    @_keeps_caller_context
    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        """Destroy the stream (work queued on it still completes); safe to call more than once."""
        self._finalizer()


def _destroy_stream(handle: Any, device: int) -> None:
    try:
        with in_primary_context(device):
            check(runtime().cudaStreamDestroy(handle), "cudaStreamDestroy")
    except Exception:        # pragma: no cover - at interpreter exit the runtime may be gone already
        pass


class StreamPool:
    """One copy stream per thread and device, so concurrent swap-ins do not serialise. A thread's
    streams are destroyed when the thread ends (its thread-local dict goes, and with it the only
    strong reference), or all at :meth:`close`."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: "weakref.WeakSet[Stream]" = weakref.WeakSet()
        self._lock = threading.Lock()

    def get(self, device: int) -> Stream:
        streams: Optional[Dict[int, Stream]] = getattr(self._local, "streams", None)
        if streams is None:
            streams = self._local.streams = {}
        stream = streams.get(device)
        if stream is None:
            stream = streams[device] = Stream(device)
            with self._lock:
                self._all.add(stream)
        return stream

    def live(self) -> int:
        """Streams not yet destroyed (for tests)."""
        with self._lock:
            return sum(1 for s in list(self._all) if s._finalizer.alive)

    def close(self) -> None:
        with self._lock:
            streams = list(self._all)
            self._all = weakref.WeakSet()
        for stream in streams:
            stream.close()


def device_pointer(value: Any) -> int:
    """A device address from an int, a ``__cuda_array_interface__`` object (torch, CuPy, Numba),
    a pycuda ``DeviceAllocation`` (``int()``), or a cuda-python pointer."""
    iface = getattr(value, "__cuda_array_interface__", None)
    if iface is not None:
        return int(iface["data"][0])
    return _ptr(value)


def describe_device(device: int) -> Dict[str, Any]:
    """``cuda_version``, ``gpu_name`` and ``compute_capability`` of ``device`` (None where they
    cannot be read: no GPU, no cuda-python)."""
    facts: Dict[str, Any] = {"cuda_version": None, "gpu_name": None, "compute_capability": None}
    try:
        rt = runtime()
        version = check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
        facts["cuda_version"] = f"{version // 1000}.{(version % 1000) // 10}"
        props = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = props.name
        facts["gpu_name"] = (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
        facts["compute_capability"] = f"{props.major}.{props.minor}"
    except Exception:  # no GPU, no cuda-python: leave them unknown
        pass
    return facts


CUBLAS_WORKSPACE = ":4096:2"       # cuBLAS workspace per handle: 2 buffers of 4096 KiB


def small_cublas_workspaces() -> None:
    """Ask cuBLAS for small workspaces (``CUBLAS_WORKSPACE_CONFIG``, unless set already). Runtimes
    make cuBLAS handles per session, and cuBLAS gives each a workspace: with its default size on
    Hopper a parked ONNX Runtime session holds ~130 MiB, with 2 x 4 MiB ~20 MiB. cuBLAS reads the
    variable when the process first uses it, so this runs when a GPU is opened (an
    :class:`~modelcache.NvmlMonitor`, a cache's device memory): a process that ran cuBLAS before
    keeps its size; set the variable yourself before that to choose another (docs/onnxruntime.md)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


class CudaMemory(DeviceMemory):
    """:class:`DeviceMemory` on a CUDA device: stream-ordered buffers on the calling thread's
    stream, pinned host pools, a thread per runtime session, and allocations measured through
    the monitor's per-process reading (NVML)."""

    kind = "cuda"
    #: planning figure for a runtime session not yet measured (an ONNX Runtime session measured
    #: 16-56 MiB parked on the H100, the plain session a first swap-in checks against more)
    session_overhead_bytes = 128 << 20
    thread_overhead_bytes = 16 << 20

    def __init__(self, monitor: Any) -> None:
        small_cublas_workspaces()
        super().__init__()
        self.monitor = monitor
        self.index = int(monitor.device)
        self.torch_device = f"cuda:{self.index}"
        self.streams = StreamPool()
        self.releaser = Releaser()

    def allocate(self, nbytes: int, owner: str = "") -> DeviceBuffer:
        if self.releaser.pending_bytes:     # the device never holds freed and new memory at once
            self.releaser.flush()
        try:
            return DeviceBuffer(nbytes, self.index, self.streams.get(self.index), streams=self.streams,
                                releaser=self.releaser)
        except DeviceOutOfMemoryError as exc:
            raise DeviceOutOfMemoryError(exc.reason, model=owner or None) from None

    def charge(self, nbytes: int, owner: str = "") -> Charge:
        return Charge(nbytes)      # the runtime's own allocation already shows on the device

    def measure(self, fn: Callable[[], T], *, expected_bytes: int, owner: str = "") -> Tuple[T, Charge]:
        before = self.monitor.process_bytes() or 0
        result = fn()
        after = self.monitor.process_bytes() or 0
        return result, Charge(max(0, after - before))

    def measure_release(self, fn: Callable[[], T]) -> Tuple[T, Optional[int]]:
        """Buffers other threads freed meanwhile are taken off (they would pass for the release);
        their allocations are not added back (one served from the pool's reserve shows nowhere):
        an error, if any, towards a smaller release."""
        before = self.monitor.process_bytes()      # frees queued before it have been given back
        freed = self.releaser.freed_total
        result = fn()
        freed = self.releaser.freed_total - freed
        after = self.monitor.process_bytes()       # and those queued meanwhile
        if not before or not after:                # 0: NVML does not list this process
            return result, None
        return result, max(0, before - after - freed)

    def measure_peak(self, fn: Callable[[], T], *, expected_bytes: int, owner: str = "") -> Tuple[T, Charge, int]:
        """The device's free memory is sampled every half millisecond while ``fn`` runs (runtimes
        release the GIL while they work): the lowest reading against the first, less what stays."""
        lowest = [self.monitor.free_bytes()]
        start = lowest[0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.0005):
                try:
                    lowest[0] = min(lowest[0], self.monitor.free_bytes())
                except Exception:           # pragma: no cover - a reading failed: the peak seen so far
                    return
        sampler = threading.Thread(target=sample, name="modelcache-peak", daemon=True)
        sampler.start()
        try:
            result, charge = self.measure(fn, expected_bytes=expected_bytes, owner=owner)
        finally:
            stop.set()
            sampler.join()
        return result, charge, max(0, start - lowest[0] - charge.nbytes)

    def copy_to_device(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        self.streams.get(self.index).copy_to_device(dst_ptr, src_ptr, nbytes)

    def copy_to_host(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        self.streams.get(self.index).copy_to_host(dst_ptr, src_ptr, nbytes)

    def synchronize(self) -> None:
        self.streams.get(self.index).synchronize()

    def stream_handle(self) -> int:
        return as_int(self.streams.get(self.index).handle)

    def new_host_pool(self) -> HostPool:
        return PinnedPool()

    def device_context(self) -> "contextlib.AbstractContextManager[None]":
        """Work of the block (a run on the caller's thread) happens in the device's primary
        context; a caller's own context (``pycuda.autoinit``) is current again afterwards."""
        return in_primary_context(self.index)

    def new_runner(self, label: str) -> Runner:
        return ThreadRunner(label)

    def describe(self) -> Dict[str, Any]:
        return describe_device(self.index)

    def close(self) -> None:
        self.releaser.close()
        self.streams.close()
