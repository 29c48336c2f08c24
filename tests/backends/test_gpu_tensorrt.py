"""TensorRT backend on a real GPU (skipped without one).

TensorRT-RTX refuses to run plans on the H100 (compute capability 9.0), and full TensorRT cannot be
installed in this workplace: the refusal is checked with a real RTX plan (``tests/data``), and the
device tier's CUDA work (device buffers, scratch pool, asynchronous copies, streams) runs for real
around the runtime double, whose execute reads and writes device memory through cuda-python.
"""
import os
import threading

import numpy as np
import pytest

import modelcache as mc
from doubles import trt_double
from conftest import record

pytestmark = pytest.mark.gpu
DATA = os.path.join(os.path.dirname(__file__), "data")
MiB = 1 << 20


def test_rtx_plan_refused_by_the_h100_is_typed_and_cache_keeps_serving(tmp_path):
    rtx = pytest.importorskip("tensorrt_rtx_bindings")
    torch = pytest.importorskip("torch")
    plan = open(os.path.join(DATA, "rtx-mlp64-sm89.plan"), "rb").read()
    with mc.ModelCache(device=0, device_budget="4GiB", reserve="1GiB", disk_dir=str(tmp_path),
                       watch_interval=None) as cache:
        cache.register("rtx", plan, backend="tensorrt", trt_module=rtx)
        cache.register("rtx-file", os.path.join(DATA, "rtx-mlp64-sm89.plan"), trt_module=rtx)
        cache.register("tensor", lambda: torch.full((1024,), 7.0))
        with cache.use("tensor") as t:
            assert t.is_cuda
        errors = {}
        for name in ("rtx", "rtx-file"):
            with pytest.raises(mc.EngineDeserializationError) as err:
                with cache.use(name):
                    pass
            errors[name] = str(err.value)
            assert err.value.trt_messages and "'%s'" % name in str(err.value)
            assert cache.info(name).tier is mc.Tier.HOST
        with cache.use("tensor") as t:                    # still serving
            assert float(t[0]) == 7.0
        stats = cache.stats()
        record("tensorrt_rtx_refusal", {"rtx_version": rtx.__version__, "errors": errors,
                                        "deserialization_errors": stats["tensorrt.deserialization_errors"],
                                        "device_free_bytes": stats["device.free_bytes"]})
        assert "compute capability" in errors["rtx"] or "GPU" in errors["rtx"]


def test_device_tier_cuda_work_runs_for_real(monkeypatch):
    pytest.importorskip("cuda.bindings")
    monkeypatch.setattr(trt_double, "DEVICE_MEMORY", True)
    with mc.ModelCache(device=0, device_budget="1GiB", reserve="1GiB", watch_interval=None) as cache:
        for name, scratch in [("a", 8 * MiB), ("b", 32 * MiB), ("c", 16 * MiB)]:
            cache.register(name, trt_double.make_plan(inputs={"x": [-1, 1024]}, outputs={"y": [-1, 1024]},
                                                      scratch_bytes=scratch, weights_bytes=4 * MiB),
                           backend="tensorrt", trt_module=trt_double)
        x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
        errors = []

        def client(name, rounds):
            try:
                for _ in range(rounds):
                    with cache.use(name) as model:
                        np.testing.assert_array_equal(model.run({"x": x})["y"], 2 * x)
            except Exception as exc:  # pragma: no cover
                errors.append(repr(exc))

        threads = [threading.Thread(target=client, args=(n, 20)) for n in "abc" for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:2]
        stats = cache.stats()
        assert stats["tensorrt.scratch.slot_bytes"] == 32 * MiB
        assert stats["tensorrt.scratch.bytes"] <= 6 * 32 * MiB            # a slot per run in flight at most
        before = cache.monitor.process_bytes()
        for name in "abc":
            cache.evict(name)
        after_evict = cache.stats()
        record("tensorrt_device_tier", {"scratch_bytes": stats["tensorrt.scratch.bytes"],
                                        "scratch_peak_slots": stats["tensorrt.scratch.peak_slots"],
                                        "process_bytes_with_engines": before,
                                        "process_bytes_after_evicting": cache.monitor.process_bytes(),
                                        "scratch_bytes_after_evicting": after_evict["tensorrt.scratch.bytes"],
                                        "runs": trt_double.STATS["execute"]})
        assert after_evict["tensorrt.scratch.bytes"] == 0                 # no engine resident: scratch freed
        assert trt_double.STATS["execute"] >= 120
