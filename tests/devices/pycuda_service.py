"""A service written after NVIDIA's TensorRT samples, serving ONNX models through modelcache:
pycuda makes the CUDA context (``pycuda.autoinit``: a context of its own; ``pycuda.autoprimaryctx``:
the device's primary context) and buffers come from ``pycuda.driver.mem_alloc``.

    python tests/devices/pycuda_service.py autoinit|autoprimaryctx MODEL_DIR

Prints one JSON line: per model and round, whether host-array runs and device-buffer runs gave
the reference output (a plain CPU session's), whether pycuda's context stayed current, and
whether pycuda still works (a kernel of its own) after modelcache moved models and closed.
Run by tests/devices/test_gpu_pycuda.py in a subprocess (a pycuda context is per process).
"""
import json
import os
import sys

mode = sys.argv[1]
if mode == "autoinit":
    import pycuda.autoinit  # noqa: F401  (makes and pushes a context of its own)
elif mode == "autoprimaryctx":
    import pycuda.autoprimaryctx  # noqa: F401  (retains and pushes the primary context)
else:
    raise SystemExit(f"unknown mode {mode!r}: autoinit or autoprimaryctx")
import numpy as np  # noqa: E402
import pycuda.driver as cuda  # noqa: E402
from pycuda.compiler import SourceModule  # noqa: E402

import onnxruntime as ort  # noqa: E402

import modelcache as mc  # noqa: E402
from modelcache.tools.generate import make_mlp, save_model  # noqa: E402

if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
HIDDEN, LAYERS = 1024, 4


def current() -> int:
    return int(cuda.Context.get_current().handle)


def pycuda_works() -> bool:
    """A kernel of the service's own, in its own context, on its own buffer."""
    module = SourceModule("__global__ void twice(float *a) { a[blockIdx.x * blockDim.x + threadIdx.x] *= 2.0f; }")
    host = np.arange(1024, dtype=np.float32)
    buf = cuda.mem_alloc(host.nbytes)
    cuda.memcpy_htod(buf, host)
    module.get_function("twice")(buf, block=(256, 1, 1), grid=(4, 1))
    back = np.empty_like(host)
    cuda.memcpy_dtoh(back, buf)
    buf.free()
    return bool(np.array_equal(back, host * 2))


def main() -> None:
    folder = sys.argv[2]
    os.makedirs(folder, exist_ok=True)
    own_context = current()
    result = {"mode": mode, "pycuda": cuda.VERSION_TEXT if hasattr(cuda, "VERSION_TEXT") else None,
              "onnxruntime": ort.__version__, "pycuda_works_before": pycuda_works(), "runs": []}
    models = {}
    for k in range(3):
        path = save_model(make_mlp(HIDDEN, LAYERS, seed=k, batch=1), os.path.join(folder, f"m{k}.onnx"))
        x = np.random.default_rng(100 + k).standard_normal((1, HIDDEN)).astype(np.float32)
        reference = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        models[f"m{k}"] = (path, x, reference)
    refs = [m[2] for m in models.values()]
    result["references_vary"] = bool(all(float(r.std()) > 0 for r in refs)
                                     and not np.allclose(refs[0], refs[1]))
    cache = mc.ModelCache(device=0, device_budget="2GiB", reserve="512MiB", watch_interval=None)
    for name, (path, _, _) in models.items():
        cache.register(name, path)
    for round_ in range(3):
        for name, (_, x, reference) in models.items():
            run = {"model": name, "round": round_}
            with cache.use(name) as model:
                out = model.run(None, {"x": x})[0]
                run["host_ok"] = bool(np.allclose(out, reference, rtol=1e-4, atol=1e-4))
                run["providers"] = model.get_providers()[:1]
                run["context_kept_after_run"] = current() == own_context
                d_x = cuda.mem_alloc(x.nbytes)
                cuda.memcpy_htod(d_x, x)
                binding = model.io_binding()
                try:
                    model.bind_device_input(binding, "x", d_x, dtype=np.float32, shape=x.shape)
                    binding.bind_output("y", "cpu")
                    model.run_with_iobinding(binding)
                    out = binding.copy_outputs_to_cpu()[0]
                    run["device"] = "ok" if np.allclose(out, reference, rtol=1e-4, atol=1e-4) else "wrong"
                except mc.ModelInputError as exc:
                    run["device"] = "refused"
                    run["refusal"] = str(exc)
                d_x.free()
            cache.evict(name)                  # frees the model's device memory on this thread
            run["tier_after_evict"] = cache.info(name).tier.name
            run["context_kept_after_evict"] = current() == own_context
            result["runs"].append(run)
    result["stats"] = {k: cache.stats()[k] for k in ("hits", "misses")}
    cache.close()
    result["context_kept_after_close"] = current() == own_context
    result["pycuda_works_after"] = pycuda_works()
    # the control: the CUDA runtime's cudaSetDevice, called on this thread, makes the primary context
    # current in place of pycuda's (what modelcache avoids doing to its callers)
    from cuda.bindings import driver, runtime
    runtime.cudaSetDevice(0)
    result["raw_cudaSetDevice_displaces_context"] = current() != own_context
    err, = driver.cuCtxSetCurrent(driver.CUcontext(own_context))
    result["context_is_primary"] = int(cuda.Device(0).retain_primary_context().handle) == own_context
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
