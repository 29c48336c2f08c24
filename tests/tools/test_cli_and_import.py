import subprocess
import sys
import textwrap

import modelcache as mc

HEAVY = ["onnxruntime", "onnx", "tensorrt", "tensorrt_rtx_bindings", "pycuda", "cuda", "pynvml", "torch"]


def test_import_needs_no_heavy_package():
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {HEAVY!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import modelcache as mc
        import numpy as np
        with mc.ModelCache(monitor=mc.SimulatedDevice(1000), device_budget=500, reserve=0) as cache:
            cache.register("a", lambda: np.zeros(10))
            with cache.use("a") as m:
                assert m.nbytes == 80
        try:
            mc.ModelCache()
        except mc.MonitorError as exc:
            assert "SimulatedDevice" in str(exc), exc
        else:
            raise AssertionError("NVML cannot work with pynvml blocked")
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "modelcache", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "demo" in out.stdout
    assert isinstance(mc.__version__, str)


def test_cuda_handles_convert_to_their_value():
    bindings = __import__("pytest").importorskip("cuda.bindings.runtime")
    from modelcache.devices.cuda import as_int
    assert as_int(bindings.cudaStream_t(1234)) == 1234


def test_every_missing_optional_package_says_which_extra_to_install(tmp_path):
    """With the optional packages blocked, each use that needs one raises a ModelCacheError naming
    the package and the pip command: onnxruntime and onnx (the ONNX Runtime backend), NVML, cuda-python
    (CUDA memory), TensorRT, prometheus_client (metrics), Ray (modelcache.ray)."""
    code = textwrap.dedent(f"""
        import sys
        BLOCKED = {HEAVY + ["prometheus_client", "ray"]!r}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import modelcache as mc
        from modelcache.backends.onnxruntime import sessions, graph
        from modelcache.backends.tensorrt import runtime
        from modelcache.devices import cuda, nvml
        import modelcache.metrics, modelcache.ray
        cache = mc.ModelCache(monitor=mc.SimulatedDevice(1000), reserve=0, watch_interval=None)
        checks = [
            (sessions.ort_module, "pip install 'modelcache[onnxruntime-gpu]'"),
            (graph.onnx_module, "pip install 'modelcache[onnxruntime]'"),
            (nvml.NvmlMonitor, "pip install 'modelcache[nvml]'"),
            (cuda.runtime, "pip install 'modelcache[cuda]'"),
            (cuda.driver, "pip install 'modelcache[cuda]'"),
            (runtime.import_trt, "pip install 'modelcache[tensorrt]'"),
            (lambda: modelcache.metrics.PrometheusCollector(cache), "pip install 'modelcache[prometheus]'"),
            (modelcache.ray.routing_options, "pip install 'modelcache[ray]'"),
        ]
        for fn, hint in checks:
            try:
                fn()
            except mc.ModelCacheError as exc:
                assert hint in str(exc), (fn, str(exc))
            else:
                raise AssertionError(f"{{fn}} worked with its package blocked")
        print("ok", len(checks))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 8"
