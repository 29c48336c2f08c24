"""ONNX Runtime backend on a real GPU (skipped without one, or without onnxruntime-gpu).

``MODELCACHE_CYCLES`` (default 1000) and ``MODELCACHE_CYCLE_MIB`` (default 512) size the
evict/restore soak; ``MODELCACHE_RESULTS_DIR`` receives the figures as JSON.
"""
import os
import time

import numpy as np
import pytest

import modelcache as mc
from conftest import record

pytestmark = pytest.mark.gpu
MiB, GiB = 2**20, 2**30
ort = pytest.importorskip("onnxruntime")
from modelcache.tools.generate import make_mlp, save_model  # noqa: E402


@pytest.fixture(scope="module")
def cuda_ort():
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return ort


@pytest.fixture(scope="module")
def big_model(tmp_path_factory, cuda_ort):
    mib = int(os.environ.get("MODELCACHE_CYCLE_MIB", "512"))
    hidden = int(round((mib * MiB / 4 / 8) ** 0.5))
    path = save_model(make_mlp(hidden, 8, bias=False, batch=1), str(tmp_path_factory.mktemp("m") / "big.onnx"),
                      external_data=True)
    x = np.random.default_rng(0).standard_normal((1, hidden)).astype(np.float32)
    plain = cuda_ort.InferenceSession(path, providers=["CUDAExecutionProvider"])
    reference = plain.run(None, {"x": x})[0]
    del plain
    return path, x, reference, 8 * hidden * hidden * 4


def test_weights_mode_evict_restore_soak(big_model):
    path, x, reference, nbytes = big_model
    cycles = int(os.environ.get("MODELCACHE_CYCLES", "1000"))
    cache = mc.ModelCache(device=0, device_budget="8GiB", reserve="1GiB", watch_interval=None)
    try:
        cache.register("big", path)
        monitor = cache.monitor
        bitwise, worst = 0, 0.0
        baseline = None
        start = time.perf_counter()
        for cycle in range(cycles + 10):
            with cache.use("big") as model:
                out = model.run(None, {"x": x})[0]
                assert "CUDAExecutionProvider" in model.get_providers()
            np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)   # checked on every cycle
            bitwise += bool(np.array_equal(out, reference))
            worst = max(worst, float(np.abs(out - reference).max()))
            cache.evict("big")
            if cycle == 9:   # warm: the long-lived session and the pinned pool exist
                baseline = monitor.process_bytes()
                start = time.perf_counter()
        elapsed = time.perf_counter() - start
        after = monitor.process_bytes()
        stats = cache.stats()
        info = cache.info("big")
        result = {
            "cycles": cycles, "model_bytes": nbytes, "mode": info.details["mode"],
            "process_bytes_after_warmup": baseline, "process_bytes_after": after, "drift_bytes": after - baseline,
            "bitwise_equal_cycles": bitwise, "max_abs_diff": worst, "seconds": elapsed,
            "swap_in_p50_s": stats["swap_in.seconds.p50"], "swap_in_p95_s": stats["swap_in.seconds.p95"],
            "swap_out_p50_s": stats["swap_out.seconds.p50"], "swap_out_p95_s": stats["swap_out.seconds.p95"],
            "host_bytes": info.host_bytes, "pinned": info.details["pinned"],
            "session_device_bytes": info.details["session_device_bytes"],
        }
        record("ort_weights_soak", result)
        assert info.details["mode"] == "weights" and info.details["pinned"]
        assert abs(after - baseline) <= 64 * MiB
    finally:
        cache.close()


def test_session_mode_and_host_serving_on_gpu(big_model):
    path, x, reference, nbytes = big_model
    cache = mc.ModelCache(device=0, device_budget="8GiB", reserve="1GiB", watch_interval=None)
    try:
        cache.register("s", path, mode="session", host_session=True)
        timings = []
        for _ in range(4):
            start = time.perf_counter()
            with cache.use("s") as model:
                timings.append(time.perf_counter() - start)
                np.testing.assert_allclose(model.run(None, {"x": x})[0], reference, rtol=1e-5, atol=1e-5)
                info = cache.info("s")
                assert info.device_bytes >= nbytes            # measured through NVML, never below the weights
            cache.evict("s")
        with cache.use("s", allow_host=True) as model:      # evicted: served at once by the CPU session
            assert model.get_providers() == ["CPUExecutionProvider"]
            np.testing.assert_allclose(model.run(None, {"x": x})[0], reference, rtol=1e-4, atol=1e-4)
        record("ort_session_mode", {"swap_in_s": timings, "device_bytes": info.device_bytes,
                                    "session_device_bytes": info.details["session_device_bytes"],
                                    "optimized_graph": info.details["optimized_graph"]})
    finally:
        cache.close()


def test_pinned_pool_reuses_blocks():
    from modelcache.devices.cuda import PinnedPool
    pool = PinnedPool()
    a = pool.get(64 * MiB)
    assert a.pinned and a.array.nbytes >= 64 * MiB
    pool.put(a)
    b = pool.get(60 * MiB)
    assert b.ptr == a.ptr and pool.allocations == 1
    pool.put(b)
    pool.close()
    assert pool.allocated_bytes == 0


def test_device_fast_path_with_torch_arrays(big_model):
    torch = pytest.importorskip("torch")
    path, x, reference, _ = big_model
    with mc.ModelCache(device=0, device_budget="8GiB", reserve="1GiB", watch_interval=None) as cache:
        cache.register("big", path)
        with cache.use("big") as model:
            x_gpu = torch.from_numpy(x).cuda()
            binding = model.io_binding()
            model.bind_device_input(binding, "x", x_gpu)
            binding.bind_output("y", "cuda", 0)
            model.run_with_iobinding(binding)
            out = binding.get_outputs()[0].numpy()
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_one_architecture_shares_one_session_and_nvml_agrees(tmp_path, cuda_ort):
    """Four fine-tunes of one model (same graph and shapes, other weights): one CUDA session, every
    output right, and the accounted bytes (weights + the session's measured bytes, once) match
    NVML's growth."""
    models = {}
    for k, hidden in enumerate((2048, 2048, 2048, 2048)):
        path = save_model(make_mlp(hidden, 4, seed=k, batch=1), str(tmp_path / f"m{k}.onnx"), external_data=True)
        x = np.random.default_rng(k).standard_normal((1, hidden)).astype(np.float32)
        plain = cuda_ort.InferenceSession(path, providers=["CUDAExecutionProvider"])
        models[f"m{k}"] = (path, x, plain.run(None, {"x": x})[0])
        del plain
    cache = mc.ModelCache(device=0, device_budget="8GiB", reserve="1GiB", watch_interval=None)
    try:
        for name, (path, _, _) in models.items():
            cache.register(name, path)
            cache.prefetch(name, tier=mc.Tier.HOST).result()
        monitor = cache.monitor
        before = monitor.process_bytes()
        for _ in range(3):
            for name, (_, x, ref) in models.items():
                with cache.use(name) as model:
                    np.testing.assert_allclose(model.run(None, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)
        grown = monitor.process_bytes() - before
        stats = cache.stats()
        shared_by = [cache.info(n).details["session_shared_by"] for n in models]
        record("ort_shared_session", {"models": len(models), "process_growth_bytes": grown,
                                      "accounted_bytes": stats["device.accounted_bytes"],
                                      "session_bytes": stats["onnxruntime.sessions.bytes"],
                                      "sessions": stats["onnxruntime.sessions"], "shared_by": shared_by})
        assert stats["onnxruntime.sessions"] == 1 and shared_by == [4, 4, 4, 4]
        assert abs(grown - stats["device.accounted_bytes"]) <= 64 * MiB
        for name in models:
            cache.evict(name)
        assert abs((monitor.process_bytes() - before) - cache.stats()["device.accounted_bytes"]) <= 64 * MiB
    finally:
        cache.close()
