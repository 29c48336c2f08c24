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


def test_buffer_of_another_context_is_refused_with_a_typed_error(fake):
    fake(PYCUDA, pointers={0xABC000: PYCUDA, 0xDEF000: PRIMARY})
    with pytest.raises(mc.ModelInputError) as info:
        cuda.check_pointer_context(0xABC000, 0, "input 'x'", "resnet")
    message = str(info.value)
    assert info.value.model == "resnet" and "pycuda.autoprimaryctx" in message and "0xabc000" in message
    cuda.check_pointer_context(0xDEF000, 0, "input 'x'", "resnet")      # the primary context's: fine
    cuda.check_pointer_context(0x999000, 0, "input 'x'", "resnet")      # unknown to the driver: not refused


def test_memory_interface_on_a_simulated_device_accepts_anything():
    memory = mc.SimulatedDevice("1MiB").memory
    with memory.device_context():
        pass
    memory.check_pointer(0xABC000, "input 'x'", "m")


def test_onnxruntime_model_checks_device_inputs(fake, monkeypatch):
    """bind_device_input refuses another context's buffer before ONNX Runtime sees it."""
    from modelcache.backends.onnxruntime import model as ort_model
    fake(PYCUDA, pointers={0xABC000: PYCUDA})
    bound = []
    obj = ort_model.OrtModel.__new__(ort_model.OrtModel)
    obj.name, obj._input_names, obj._specs, obj._device = "bert", ["x"], {}, ("cuda", 0)
    binding = types.SimpleNamespace(bind_input=lambda *a: bound.append(a))
    with pytest.raises(mc.ModelInputError, match="belongs to CUDA context"):
        obj.bind_device_input(binding, "x", 0xABC000, dtype="float32", shape=[1, 4])
    assert bound == []
