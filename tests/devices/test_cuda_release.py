"""Evictions do not wait for the driver to take freed memory back: a stream-ordered free returns
at once and the releaser's thread synchronizes the stream (which hands the memory to the driver);
meanwhile NVML readings count the bytes as free and per-process readings wait for them. Against
a fake CUDA runtime and a fake NVML (the real ones run in the GPU tests)."""
import contextlib
import threading
import types

import pytest

from modelcache.devices import cuda, nvml

OK = 0
MiB = 1 << 20


class FakeRuntime:
    """The runtime-API calls a stream-ordered buffer makes; the device's used bytes as NVML
    would see them: a free is released (no longer used) only when its stream is synchronized."""

    class cudaError_t:
        cudaSuccess = OK

    def __init__(self):
        self.used = 0
        self.freed_unreleased = 0
        self.sync_gate = threading.Event()     # a stream synchronize waits for this (the driver's unmapping)
        self.sync_gate.set()
        self.sync_threads = []

    def cudaMallocAsync(self, nbytes, stream):
        self.used += nbytes
        return (OK, 0x10000 + self.used)

    def cudaFreeAsync(self, ptr, stream):
        stream.freed.append(ptr)
        return (OK,)

    def cudaStreamSynchronize(self, handle):
        self.sync_threads.append(threading.current_thread().name)
        self.sync_gate.wait(5)
        return (OK,)


class FakeStream:
    def __init__(self, rt, device=0):
        self.rt, self.device, self.freed, self.nbytes = rt, device, [], {}
        self.handle = self                 # the runtime calls get the stream itself

    def synchronize(self):
        self.rt.cudaStreamSynchronize(self.handle)
        for ptr in self.freed:            # the driver has the memory back
            self.rt.used -= self.nbytes.pop(ptr)
        self.freed.clear()


class FakeStreams:
    def __init__(self, stream):
        self.stream = stream

    def get(self, device):
        return self.stream


@pytest.fixture
def fake(monkeypatch):
    rt = FakeRuntime()
    monkeypatch.setattr(cuda, "runtime", lambda: rt)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(cuda, "stream_ordered", lambda device: True)
    monkeypatch.setattr(cuda, "in_primary_context", lambda device: contextlib.nullcontext())
    return rt


def _buffer(rt, stream, nbytes, releaser):
    buf = cuda.DeviceBuffer.__new__(cuda.DeviceBuffer)
    buf._streams, buf._releaser, buf.device, buf.ordered = FakeStreams(stream), releaser, 0, True
    buf.ptr = cuda._ptr(rt.cudaMallocAsync(nbytes, stream.handle)[1])
    buf.nbytes = nbytes
    stream.nbytes[buf.ptr] = nbytes
    return buf


def test_a_free_returns_before_the_driver_has_the_memory_back(fake):
    stream, releaser = FakeStream(fake), cuda.Releaser()
    buf = _buffer(fake, stream, 512 * MiB, releaser)
    fake.sync_gate.clear()                    # the driver is slow to take it back
    buf.free()                                # returns although the synchronize has not finished
    assert buf.ptr == 0 and stream.freed
    assert releaser.pending_bytes == 512 * MiB and fake.used == 512 * MiB
    assert not releaser.flush(timeout=0.05)   # still releasing
    fake.sync_gate.set()
    assert releaser.flush(timeout=5)
    assert releaser.pending_bytes == 0 and fake.used == 0
    assert fake.sync_threads == ["modelcache-releaser"]       # synchronized off the freeing thread
    buf.free()                                # idempotent: nothing queued again
    assert releaser.pending_bytes == 0
    releaser.close()


def test_an_explicit_stream_or_no_releaser_synchronizes_on_the_freeing_thread(fake):
    stream = FakeStream(fake)
    _buffer(fake, stream, MiB, None).free()
    assert fake.used == 0 and fake.sync_threads == [threading.current_thread().name]
    releaser = cuda.Releaser()
    _buffer(fake, stream, MiB, releaser).free(stream)
    assert fake.used == 0 and releaser.pending_bytes == 0
    releaser.close()
    _buffer(fake, stream, MiB, releaser).free()          # after close: on the freeing thread
    assert fake.used == 0 and releaser.pending_bytes == 0
    assert set(fake.sync_threads) == {threading.current_thread().name}


class FakeNvml:
    def __init__(self, rt, total):
        self.rt, self.total = rt, total

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(free=self.total - self.rt.used, total=self.total)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        import os
        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.rt.used)]


def test_nvml_readings_see_the_memory_freed_while_it_is_released(fake):
    import cachetools
    monitor = nvml.NvmlMonitor.__new__(nvml.NvmlMonitor)
    monitor.device, monitor._handle, monitor._pynvml = 0, None, FakeNvml(fake, 4096 * MiB)
    monitor._procs, monitor._procs_lock = cachetools.TTLCache(maxsize=1, ttl=0.05), threading.Lock()
    releaser = cuda.Releaser()
    monitor.__dict__["_memory"] = types.SimpleNamespace(releaser=releaser)
    stream = FakeStream(fake)
    buf = _buffer(fake, stream, 1024 * MiB, releaser)
    assert monitor.free_bytes() == 3072 * MiB
    fake.sync_gate.clear()
    buf.free()
    assert monitor.free_bytes() == 4096 * MiB          # counted as free while the driver takes it back
    threading.Timer(0.1, fake.sync_gate.set).start()
    assert monitor.process_bytes() == 0                # a per-process reading waits for the release
    assert monitor.free_bytes() == 4096 * MiB          # and nothing is counted twice afterwards
    releaser.close()


def test_an_allocation_waits_for_frees_still_being_released(fake, monkeypatch):
    """The device never holds an evicted model's memory and its successor's at once."""
    memory = cuda.CudaMemory(types.SimpleNamespace(device=0))
    stream = FakeStream(fake)
    old = _buffer(fake, stream, 256 * MiB, memory.releaser)
    fake.sync_gate.clear()
    old.free()
    seen = []

    class Recorded:
        def __init__(self, nbytes, device, stream=None, streams=None, releaser=None):
            seen.append((fake.used, releaser.pending_bytes))
    monkeypatch.setattr(cuda, "DeviceBuffer", Recorded)
    monkeypatch.setattr(memory.streams, "get", lambda device: stream)
    threading.Timer(0.1, fake.sync_gate.set).start()
    memory.allocate(128 * MiB)
    assert seen == [(0, 0)]                  # the old buffer was back with the driver first
    memory.releaser.close()


def test_measure_peak_samples_the_device_while_the_call_runs():
    """A session's creation briefly takes more than it keeps: the device's free memory is sampled
    while the call runs, and the peak beyond what stays is returned with the charge."""
    state = {"free": 1000 * MiB, "process": 10 * MiB}

    class Monitor:
        def free_bytes(self):
            return state["free"]

        def process_bytes(self):
            return state["process"]

    def work():
        import time
        state["free"] -= 300 * MiB                 # the search's workspaces
        time.sleep(0.05)
        state["free"] += 260 * MiB                 # given back: 40 MiB stay
        state["process"] += 40 * MiB
        return "made"
    memory = types.SimpleNamespace(monitor=Monitor())
    memory.measure = lambda fn, **kw: cuda.CudaMemory.measure(memory, fn, **kw)
    result, charge, peak = cuda.CudaMemory.measure_peak(memory, work, expected_bytes=0)
    assert result == "made" and charge.nbytes == 40 * MiB and peak == 260 * MiB


def test_a_release_is_measured_without_the_buffers_other_threads_freed_meanwhile():
    """``measure_release`` (a shrink of ONNX Runtime's arena): the process's reading before less
    after, less the bytes of buffers freed meanwhile (they would pass for the arena's); no reading
    (NVML does not list the process): unknown."""
    class Monitor:
        device = 0

        def __init__(self, readings):
            self.readings = list(readings)

        def process_bytes(self):
            return self.readings.pop(0)

    memory = cuda.CudaMemory(Monitor([1000 * MiB, 600 * MiB]))

    def shrink_while_another_thread_frees():
        memory.releaser.freed_total += 300 * MiB
        return "shrunk"
    assert memory.measure_release(shrink_while_another_thread_frees) == ("shrunk", 100 * MiB)
    memory.monitor = Monitor([1000 * MiB, 900 * MiB])
    assert memory.measure_release(shrink_while_another_thread_frees) == ("shrunk", 0)   # never below 0
    memory.monitor = Monitor([0, 0])
    assert memory.measure_release(lambda: None) == (None, None)
    memory.close()
