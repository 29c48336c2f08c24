"""The caller's CUDA context is kept across modelcache's CUDA work (pycuda.autoinit services),
and device buffers of another context are refused: the logic, against a fake driver API (the
real one runs in tests/devices/test_gpu_pycuda.py on a GPU)."""
import types

import pytest

import modelcache as mc
from modelcache.devices import cuda

OK = 0
PRIMARY, PYCUDA = 0x1000, 0x2000


class FakeDriver:
    """The few driver-API calls the context logic makes, over one thread's current context."""

    class CUresult:
        CUDA_SUCCESS = OK

    class CUpointer_attribute:
        CU_POINTER_ATTRIBUTE_CONTEXT = 1

    def __init__(self, current: int, pointers=None):
        self.current = current
        self.pointers = pointers or {}
        self.calls = []

    def cuInit(self, flags):
        return (OK,)

    def cuDeviceGet(self, ordinal):
        return (OK, ordinal)

    def cuDevicePrimaryCtxRetain(self, dev):
        return (OK, PRIMARY + dev)

    def cuCtxGetCurrent(self):
        return (OK, self.current)

    def cuCtxSetCurrent(self, ctx):
        self.calls.append(("set", ctx))
        self.current = ctx
        return (OK,)

    def cuGetErrorName(self, err):
        return (OK, b"CUDA_ERROR_FAKE")

    def cuPointerGetAttribute(self, attribute, ptr):
        if ptr not in self.pointers:
            return (1, None)            # CUDA_ERROR_INVALID_VALUE: not a device pointer the driver knows
        return (OK, self.pointers[ptr])


@pytest.fixture
def fake(monkeypatch):
    def install(current, pointers=None):
        drv = FakeDriver(current, pointers)

        def set_device(device):
            drv.calls.append(("cudaSetDevice", device))
            drv.current = PRIMARY + device
        monkeypatch.setattr(cuda, "driver", lambda: drv)
        monkeypatch.setattr(cuda, "set_device", set_device)
        monkeypatch.setattr(cuda, "_primary_contexts", {})
        return drv
    return install


def test_foreign_context_is_current_again_after_the_block(fake):
    drv = fake(PYCUDA)
    with cuda.in_primary_context(0):
        assert drv.current == PRIMARY             # modelcache's work runs in the primary context
    assert drv.current == PYCUDA                  # and the caller gets pycuda's back
    assert drv.calls == [("set", PRIMARY), ("set", PYCUDA)]


def test_foreign_context_is_restored_when_the_block_raises(fake):
    drv = fake(PYCUDA)
    with pytest.raises(RuntimeError, match="boom"):
        with cuda.in_primary_context(0):
            raise RuntimeError("boom")
    assert drv.current == PYCUDA


@pytest.mark.parametrize("current", [0, PRIMARY], ids=["no-context", "primary"])
def test_no_switch_without_a_foreign_context(fake, current):
    drv = fake(current)
    with cuda.in_primary_context(0):
        pass
    assert drv.calls == [] and drv.current == current


def test_primary_context_of_another_device_is_kept(fake):
    drv = fake(PRIMARY + 1)                       # the caller works on device 1; modelcache on 0
    with cuda.in_primary_context(0):
        assert drv.current == PRIMARY
    assert drv.current == PRIMARY + 1


def test_decorated_stream_method_keeps_the_callers_context(fake):
    drv = fake(PYCUDA)
    seen = []

    class Thing:
        device = 0

        @cuda._keeps_caller_context
        def work(self, x):
            seen.append(drv.current)
            return x * 2
    assert Thing().work(21) == 42
    assert seen == [PRIMARY] and drv.current == PYCUDA


def test_memory_interface_on_a_simulated_device_switches_nothing():
    memory = mc.SimulatedDevice("1MiB").memory
    with memory.device_context():
        pass


class FakeBinding:
    """ONNX Runtime's IOBinding as far as the test needs: every call makes the primary context
    current, as ONNX Runtime's own cudaSetDevice does on a thread's first CUDA call."""

    def __init__(self, drv):
        self.drv, self.calls = drv, []

    def _call(self, name, *args):
        self.calls.append((name, self.drv.current))
        self.drv.current = PRIMARY

    def bind_input(self, *args):
        self._call("bind_input", *args)

    def bind_output(self, *args):
        self._call("bind_output", *args)

    def copy_outputs_to_cpu(self):
        self._call("copy_outputs_to_cpu")
        return ["out"]


def test_onnxruntime_binding_keeps_the_callers_context(fake):
    """io_binding() on a GPU hands out a binding whose calls run in the primary context and give
    the caller's context back; run_with_iobinding gives ONNX Runtime the binding itself."""
    from modelcache.backends.onnxruntime import model as ort_model
    drv = fake(PYCUDA)
    made, ran = [], []

    class Session:
        def io_binding(self):
            made.append(drv.current)
            drv.current = PRIMARY          # what ONNX Runtime does on a thread's first call
            return FakeBinding(drv)

        def run_with_iobinding(self, binding, options):
            ran.append(binding)

    obj = ort_model.OrtModel.__new__(ort_model.OrtModel)
    obj.name, obj._input_names, obj._specs, obj._device = "bert", ["x"], {}, ("cuda", 0)
    obj._session, obj._weights, obj.valid, obj._runner, obj._run_options = Session(), [], True, None, None
    obj._context = lambda: cuda.in_primary_context(0)      # what CudaMemory.device_context gives
    binding = obj.io_binding()
    assert made == [PRIMARY] and drv.current == PYCUDA
    obj.bind_device_input(binding, "x", 0xABC000, dtype="float32", shape=[1, 4])
    binding.bind_output("y", "cpu")
    obj.run_with_iobinding(binding)
    assert binding.copy_outputs_to_cpu() == ["out"]
    assert drv.current == PYCUDA                       # after every call
    assert [c for c in binding.binding.calls] == [("bind_input", PRIMARY), ("bind_output", PRIMARY),
                                                  ("copy_outputs_to_cpu", PRIMARY)]
    assert ran == [binding.binding]                    # ONNX Runtime gets its own object


def test_onnxruntime_binding_on_the_host_is_not_wrapped(fake):
    from modelcache.backends.onnxruntime import model as ort_model
    drv = fake(PYCUDA)

    class Session:
        def io_binding(self):
            return FakeBinding(drv)

        def get_provider_options(self):
            return {"CPUExecutionProvider": {}}

    obj = ort_model.OrtModel.__new__(ort_model.OrtModel)
    obj._device, obj._session, obj._weights, obj.valid, obj._context = None, Session(), [], True, None
    assert isinstance(obj.io_binding(), FakeBinding)


@pytest.mark.parametrize("mode", ["weights", "session"])
def test_a_device_sessions_binding_calls_run_in_the_devices_context(tmp_path, monkeypatch, mode):
    """A model on the device (either swap design) hands out bindings whose calls go through its
    device's context (``DeviceMemory.device_context``: the primary context on a GPU); no backend
    asks which kind of device it is."""
    pytest.importorskip("onnxruntime")
    import contextlib
    import numpy as np
    from modelcache.tools.generate import make_mlp, save_model
    device = mc.SimulatedDevice("64MiB")
    entered = []

    @contextlib.contextmanager
    def recorded():
        entered.append(1)
        yield
    monkeypatch.setattr(type(device.memory), "device_context", lambda self: recorded())
    path = save_model(make_mlp(64, 2, seed=0), str(tmp_path / "m.onnx"))
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        cache.register("m", path, mode=mode, weights_threshold=1024)
        with cache.use("m") as model:
            entered.clear()
            binding = model.io_binding()
            binding.bind_cpu_input("x", np.ones((1, 64), np.float32))
            binding.bind_output(model.get_outputs()[0].name, "cpu")
            model.run_with_iobinding(binding)
            assert binding.copy_outputs_to_cpu()[0].shape == (1, 64)
            assert len(entered) >= 4        # making the binding, and each of its three calls
