"""CUDA memory work through cuda-python (``cuda-bindings``), imported lazily.

Pinned host blocks (pooled: pinning runs at ~2 GB/s, so blocks are reused), device buffers and
asynchronous copies on a stream. Everything uses the CUDA runtime API and therefore the device's
primary context, which ONNX Runtime, torch and ``pycuda.autoprimaryctx`` share: pointers from
any of them can be mixed. Without a GPU, :class:`HostPool` gives plain (pageable) numpy blocks
with the same interface, so backends have one code path.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, Dict, List, Optional

import numpy as np

from .errors import DeviceOutOfMemoryError, ModelCacheError

_ALIGN = 256


def align(nbytes: int, alignment: int = _ALIGN) -> int:
    return (nbytes + alignment - 1) // alignment * alignment


def runtime() -> Any:
    """The ``cuda.bindings.runtime`` module (``cuda.cudart`` on older cuda-python)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # type: ignore[no-redef]
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
    rt = runtime()
    check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")


def as_int(value: Any) -> int:
    """An address or handle as an int. cuda-python handles (``cudaStream_t``...) convert with
    ``int()``; their ``getPtr()`` is the address of the handle's storage, not the handle."""
    return int(value)


_ptr = as_int


class HostBlock:
    """A block of host memory; ``array`` is a uint8 numpy view of it, ``ptr`` its address."""

    __slots__ = ("ptr", "nbytes", "array", "pinned", "_owner")

    def __init__(self, ptr: int, nbytes: int, array: np.ndarray, pinned: bool, owner: Any = None) -> None:
        self.ptr, self.nbytes, self.array, self.pinned, self._owner = ptr, nbytes, array, pinned, owner

    def view(self, offset: int, nbytes: int, dtype: Any, shape: Any) -> np.ndarray:
        return self.array[offset:offset + nbytes].view(dtype).reshape(shape)


class HostPool:
    """Reusable host blocks. The base class gives pageable numpy blocks (machines without CUDA);
    :class:`PinnedPool` gives page-locked ones. Freed blocks are kept (up to ``max_idle_bytes``)
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
        array = np.empty(nbytes, dtype=np.uint8)
        return HostBlock(array.ctypes.data, nbytes, array, pinned=False)

    def _release(self, block: HostBlock) -> None:
        block.array = None  # type: ignore[assignment]


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


class DeviceBuffer:
    """``nbytes`` of device memory; :meth:`free` is idempotent. With a ``stream`` (and pools
    supported, see :func:`stream_ordered`) it is allocated and freed in that stream's order,
    else with ``cudaMalloc``/``cudaFree`` (which synchronizes the device)."""

    __slots__ = ("ptr", "nbytes", "device", "ordered")

    def __init__(self, nbytes: int, device: int, stream: Optional["Stream"] = None) -> None:
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

    def free(self, stream: Optional["Stream"] = None) -> None:
        """Free the buffer; its contents must no longer be in use by any stream. With a
        ``stream``, a stream-ordered buffer is freed in that stream's order and the stream is
        synchronized (the memory is back with the driver on return)."""
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            rt = runtime()
            if self.ordered and stream is not None:
                check(rt.cudaFreeAsync(ptr, stream.handle), "cudaFreeAsync")
                stream.synchronize()
            else:
                check(rt.cudaFree(ptr), "cudaFree")


class Stream:
    """A non-blocking CUDA stream for copies on one device."""

    def __init__(self, device: int) -> None:
        rt = runtime()
        set_device(device)
        self.device = device
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def copy_to_device(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        rt = runtime()
        check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle),
              "cudaMemcpyAsync(host to device)")

    def copy_to_host(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        rt = runtime()
        check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle),
              "cudaMemcpyAsync(device to host)")

    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(runtime().cudaStreamDestroy(handle), "cudaStreamDestroy")


class StreamPool:
    """One copy stream per thread and device, so concurrent swap-ins do not serialise."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: List[Stream] = []
        self._lock = threading.Lock()

    def get(self, device: int) -> Stream:
        streams: Dict[int, Stream] = getattr(self._local, "streams", None) or {}
        self._local.streams = streams
        stream = streams.get(device)
        if stream is None:
            stream = streams[device] = Stream(device)
            with self._lock:
                self._all.append(stream)
        return stream

    def close(self) -> None:
        with self._lock:
            streams, self._all = self._all, []
        for stream in streams:
            try:
                stream.close()
            except ModelCacheError:
                pass


def device_pointer(value: Any) -> int:
    """A device address from an int, a ``__cuda_array_interface__`` object (torch, CuPy, Numba),
    a pycuda ``DeviceAllocation`` (``int()``), or a cuda-python pointer."""
    iface = getattr(value, "__cuda_array_interface__", None)
    if iface is not None:
        return int(iface["data"][0])
    return _ptr(value)
