"""A service written after NVIDIA's TensorRT samples, serving ONNX models through modelcache:
pycuda makes the CUDA context (``pycuda.autoinit``: a context of its own; ``pycuda.autoprimaryctx``:
the device's primary context) and buffers come from ``pycuda.driver.mem_alloc``.

    python tests/devices/pycuda_service.py autoinit|autoprimaryctx|crossread MODEL_DIR

Prints one JSON line: per model and round, whether host-array runs and device-buffer runs gave
the reference output (a plain CPU session's), which context was really current on the service's
thread after each step (the driver's ``cuCtxGetCurrent``: pycuda's ``Context.get_current()``
reads pycuda's own bookkeeping, not the driver), and whether pycuda still works (a kernel of its
own) after modelcache moved models and closed. ``crossread`` (no modelcache) checks whether a
plain ONNX Runtime CUDA session can read a buffer of pycuda.autoinit's context.
Run by tests/devices/test_gpu_pycuda.py in a subprocess (a pycuda context is per process).
"""
import json
import os
import sys

mode = sys.argv[1]
if mode in ("autoinit", "crossread"):
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


from cuda.bindings import driver as cu_driver  # noqa: E402


def current() -> int:
    """The context really current on this thread (the driver's view)."""
    err, ctx = cu_driver.cuCtxGetCurrent()
    return int(ctx) if ctx is not None else 0


def owner(ptr: int) -> int:
    err, ctx = cu_driver.cuPointerGetAttribute(cu_driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_CONTEXT, ptr)
    return int(ctx) if ctx is not None else 0


class Trail:
    """Which context is current after each step: 'own' (the service's), 'primary', 'none' or 'other'."""

    def __init__(self, own: int, primary: int) -> None:
        self.own, self.primary, self.steps = own, primary, []

    def __call__(self, step: str) -> None:
        now = current()
        kind = "own" if now == self.own else "primary" if now == self.primary else "none" if not now else "other"
        self.steps.append([step, kind])
        if now != self.own:                      # put it back, so later steps are judged on their own
            cu_driver.cuCtxSetCurrent(cu_driver.CUcontext(self.own))

    def displaced(self):
        return [step for step, kind in self.steps if kind != "own"]


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


def make_models(folder: str):
    models = {}
    for k in range(3):
        path = save_model(make_mlp(HIDDEN, LAYERS, seed=k, batch=1), os.path.join(folder, f"m{k}.onnx"))
        x = np.random.default_rng(100 + k).standard_normal((1, HIDDEN)).astype(np.float32)
        reference = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        models[f"m{k}"] = (path, x, reference)
    return models


def crossread(folder: str) -> dict:
    """No modelcache: can a plain ONNX Runtime CUDA session (primary context) read a buffer that
    pycuda.autoinit's context allocated? (The answer decides whether modelcache refuses them.)"""
    path, x, reference = make_models(folder)["m0"]
    session = ort.InferenceSession(path, providers=["CUDAExecutionProvider"])
    d_x = cuda.mem_alloc(x.nbytes)
    cuda.memcpy_htod(d_x, x)
    result = {"mode": mode, "buffer_in_own_context": owner(int(d_x)) == current()}
    binding = session.io_binding()
    binding.bind_input("x", "cuda", 0, np.float32, list(x.shape), int(d_x))
    binding.bind_output("y", "cpu")
    try:
        session.run_with_iobinding(binding)
        out = binding.copy_outputs_to_cpu()[0]
        result["read"] = "ok" if np.allclose(out, reference, rtol=1e-4, atol=1e-4) else "wrong"
    except Exception as exc:  # an illegal address, or ORT refusing
        result["read"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
    return result


def main() -> None:
    folder = sys.argv[2]
    os.makedirs(folder, exist_ok=True)
    if mode == "crossread":
        print(json.dumps(crossread(folder)), flush=True)
        return
    own = current()
    primary = int(cuda.Device(0).retain_primary_context().handle)
    trail = Trail(own, primary)
    result = {"mode": mode, "context_is_primary": own == primary, "onnxruntime": ort.__version__,
              "pycuda_works_before": pycuda_works(), "runs": []}
    # the control: the CUDA runtime's cudaSetDevice on this thread, first call, puts the primary
    # context in place of pycuda's (what modelcache must not do to its callers)
    from cuda.bindings import runtime
    runtime.cudaSetDevice(0)
    result["raw_cudaSetDevice_displaces_context"] = current() != own
    cu_driver.cuCtxSetCurrent(cu_driver.CUcontext(own))
    models = make_models(folder)
    refs = [m[2] for m in models.values()]
    result["references_vary"] = bool(all(float(r.std()) > 0 for r in refs) and not np.allclose(refs[0], refs[1]))
    trail("setup")
    cache = mc.ModelCache(device=0, device_budget="2GiB", reserve="512MiB", watch_interval=None)
    trail("ModelCache()")
    for name, (path, _, _) in models.items():
        cache.register(name, path)
    trail("register")
    for round_ in range(3):
        for name, (_, x, reference) in models.items():
            run = {"model": name, "round": round_}
            with cache.use(name) as model:
                trail("use: enter")
                out = model.run(None, {"x": x})[0]
                trail("run (host arrays)")
                run["host_ok"] = bool(np.allclose(out, reference, rtol=1e-4, atol=1e-4))
                run["providers"] = model.get_providers()[:1]
                d_x = cuda.mem_alloc(x.nbytes)
                cuda.memcpy_htod(d_x, x)
                run["buffer_in_own_context"] = owner(int(d_x)) == own
                binding = model.io_binding()
                trail("io_binding")
                try:
                    model.bind_device_input(binding, "x", d_x, dtype=np.float32, shape=x.shape)
                    trail("bind_device_input")
                    binding.bind_output("y", "cpu")
                    trail("binding.bind_output (ONNX Runtime's, called by the service)")
                    model.run_with_iobinding(binding)
                    trail("run_with_iobinding")
                    out = binding.copy_outputs_to_cpu()[0]
                    trail("binding.copy_outputs_to_cpu (ONNX Runtime's, called by the service)")
                    run["device"] = "ok" if np.allclose(out, reference, rtol=1e-4, atol=1e-4) else "wrong"
                except mc.ModelInputError as exc:
                    trail("bind_device_input (refused)")
                    run["device"] = "refused"
                    run["refusal"] = str(exc)
                d_x.free()
            trail("use: exit")
            cache.evict(name)                  # frees the model's device memory on this thread
            trail("evict")
            run["tier_after_evict"] = cache.info(name).tier.name
            result["runs"].append(run)
    result["stats"] = {k: cache.stats()[k] for k in ("hits", "misses")}
    cache.close()
    trail("close")
    result["pycuda_works_after"] = pycuda_works()
    result["trail"] = trail.steps
    result["displaced_after"] = sorted(set(trail.displaced()))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
