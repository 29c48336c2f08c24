"""Swap-in and swap-out times of one ONNX model, every way, in one run.

    python benchmarks/ort_swap.py [--mib 512] [--cycles 5] [--json out.json] [--check]

A generated model of ``--mib`` MiB (8 x MatMul of float32 weights; 512 MiB = 8 x 4096^2), saved
as one ``model.onnx`` as the seed loads it, is moved off the device and back by:

- the seed's recipe: ``session.set_providers(["CPUExecutionProvider"])`` and back to CUDA;
- stock re-creation: delete the session, ``InferenceSession("model.onnx")`` again (and, for
  comparison, from a copy whose weights are in an external-data file);
- modelcache, mode="session" and mode="weights" (``cache.evict`` / the swap-in inside ``use``);
- the floor: one pinned host -> device copy of the weights (cudaMemcpyAsync from a pinned block).

On a machine without a GPU the "device" is simulated: sessions run on the CPU provider, the
seed's recipe becomes ``set_providers(["CPUExecutionProvider"])`` again (a session re-initialise),
and the floor is a host memcpy of the weights. Times are medians over ``--cycles`` (seconds,
printed in ms); ratios are computed from figures measured in this run. ``--check`` exits 1 if
the H100 goals are missed: weights swap-in <= 1.5 x floor, >= 100 x faster than set_providers,
swap-out <= 5 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import modelcache as mc  # noqa: E402
from modelcache.tools.generate import make_mlp, save_model  # noqa: E402

MiB = 1 << 20


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--slow-cycles", type=int, default=3, help="cycles for the slow baselines")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--check", action="store_true", help="exit 1 if the H100 goals are missed")
    parser.add_argument("--simulate", action="store_true", help="simulated device even if a GPU is there")
    args = parser.parse_args()

    import onnxruntime as ort
    gpu = not args.simulate and _has_gpu(ort)
    hidden = int(round((args.mib * MiB / 4 / args.layers) ** 0.5))
    folder = tempfile.mkdtemp(prefix="ort-swap-")
    model = make_mlp(hidden, args.layers, bias=False, batch=1)
    path = save_model(model, os.path.join(folder, "model.onnx"))          # one file, as the seed loads it
    ext_path = save_model(model, os.path.join(folder, "model-ext.onnx"), external_data=True)
    del model
    weights_bytes = args.layers * hidden * hidden * 4
    x = np.random.default_rng(0).standard_normal((1, hidden)).astype(np.float32)
    cuda = [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}), "CPUExecutionProvider"]
    device_providers = cuda if gpu else ["CPUExecutionProvider"]
    res = {"device": _device_name(gpu), "onnxruntime": ort.__version__, "python": platform.python_version(),
           "model_bytes": weights_bytes, "hidden": hidden, "layers": args.layers, "cycles": args.cycles,
           "date": time.strftime("%Y-%m-%d")}
    print(f"{res['device']}; onnxruntime {ort.__version__}; model {weights_bytes / MiB:.0f} MiB "
          f"({args.layers} x MatMul {hidden}^2 fp32)", flush=True)

    # reference output and run time on the device
    plain = ort.InferenceSession(path, providers=device_providers)
    reference = plain.run(None, {"x": x})[0]
    res["plain_run_s"] = median([timed(lambda: plain.run(None, {"x": x}))[0] for _ in range(5)])

    # 1. the seed's recipe: set_providers
    outs, ins = [], []
    for _ in range(args.slow_cycles):
        outs.append(timed(lambda: plain.set_providers(["CPUExecutionProvider"]))[0])
        ins.append(timed(lambda: plain.set_providers([p if isinstance(p, str) else p[0] for p in device_providers],
                                                     [{} if isinstance(p, str) else p[1] for p in device_providers]))[0])
    res["set_providers_out_s"], res["set_providers_in_s"] = median(outs), median(ins)
    plain = None   # drop the session before the next measurements

    # 2. stock re-creation: from the seed's single file, and from an external-data file
    for key, source in (("recreate_in_s", path), ("recreate_external_in_s", ext_path)):
        ins = []
        for _ in range(args.slow_cycles):
            t, sess = timed(lambda: ort.InferenceSession(source, providers=device_providers))
            ins.append(t)
            del sess
        res[key] = median(ins)

    # 3. the floor: one copy of the weights into device memory
    res["floor_s"] = _floor(weights_bytes, gpu, args.cycles)

    # 4. modelcache, each mode
    monitor = None if gpu else mc.SimulatedDevice(4 * weights_bytes + 256 * MiB)
    with mc.ModelCache(monitor=monitor, device_budget=3 * weights_bytes, reserve=0, watch_interval=None) as cache:
        for mode in ("session", "weights"):
            name = f"model-{mode}"
            cache.register(name, path, mode=mode)
            load_s, _ = timed(lambda: cache.prefetch(name, tier=mc.Tier.HOST).result())
            outs, ins, firsts, diffs = [], [], [], []
            for cycle in range(args.cycles + 1):
                lease = cache.use(name)
                t_in, model = timed(lease.acquire)
                t_run, out = timed(lambda: model.run(None, {"x": x})[0])
                diffs.append(float(np.abs(out - reference).max()))
                lease.release()
                t_out, _ = timed(lambda: cache.evict(name))
                if cycle:   # the first swap-in creates the long-lived session (weights mode) or saves the
                    ins.append(t_in)          # optimized graph (session mode): reported apart
                    firsts.append(t_in + t_run)
                    outs.append(t_out)
                else:
                    res[f"{mode}_first_swap_in_s"] = t_in
            res[f"{mode}_load_s"] = load_s
            res[f"{mode}_in_s"], res[f"{mode}_out_s"] = median(ins), median(outs)
            res[f"{mode}_in_plus_first_run_s"] = median(firsts)
            res[f"{mode}_max_abs_diff"] = max(diffs)
            res[f"{mode}_mode"] = cache.info(name).details["mode"]
            cache.unregister(name)

    res["weights_in_over_floor"] = res["weights_in_s"] / res["floor_s"]
    res["set_providers_over_weights_in"] = res["set_providers_in_s"] / res["weights_in_s"]
    res["recreate_over_weights_in"] = res["recreate_in_s"] / res["weights_in_s"]
    res["session_in_over_floor"] = res["session_in_s"] / res["floor_s"]
    _print(res, gpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.check:
        ok = (res["weights_in_over_floor"] <= 1.5 and res["set_providers_over_weights_in"] >= 100
              and res["weights_out_s"] <= 0.005)
        print("goals (weights in <= 1.5 x floor, >= 100 x set_providers, out <= 5 ms):", "met" if ok else "NOT met")
        return 0 if ok else 1
    return 0


def _has_gpu(ort) -> bool:
    try:
        mc.NvmlMonitor(0).close()
    except mc.MonitorError:
        return False
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _device_name(gpu: bool) -> str:
    if gpu:
        m = mc.NvmlMonitor(0)
        name = m.name
        m.close()
        return f"GPU: {name}"
    return f"CPU only ({os.cpu_count()} cores, simulated device)"


def _floor(nbytes: int, gpu: bool, cycles: int) -> float:
    if not gpu:
        src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
        return median([timed(lambda: np.copyto(dst, src))[0] for _ in range(cycles)])
    from modelcache.devices.cuda import DeviceBuffer, PinnedPool, Stream
    pool, stream = PinnedPool(), Stream(0)
    block = pool.get(nbytes)
    block.array[:] = 1
    buf = DeviceBuffer(nbytes, 0)
    times = []
    for _ in range(cycles + 1):
        start = time.perf_counter()
        stream.copy_to_device(buf.ptr, block.ptr, nbytes)
        stream.synchronize()
        times.append(time.perf_counter() - start)
    buf.free()
    pool.put(block)
    pool.close()
    stream.close()
    return median(times[1:])


def _print(r, gpu) -> None:
    ms = lambda s: f"{s * 1e3:9.2f} ms"  # noqa: E731
    seed = "set_providers (seed §14)" if gpu else "set_providers (CPU re-init)"
    print(f"{'method':<34} {'swap-out':>12} {'swap-in':>12}")
    print(f"{seed:<34} {ms(r['set_providers_out_s']):>12} {ms(r['set_providers_in_s']):>12}")
    print(f"{'stock InferenceSession(model.onnx)':<34} {'(del)':>12} {ms(r['recreate_in_s']):>12}")
    print(f"{'stock, weights in external data':<34} {'(del)':>12} {ms(r['recreate_external_in_s']):>12}")
    print(f"{'modelcache mode=session':<34} {ms(r['session_out_s']):>12} {ms(r['session_in_s']):>12}")
    print(f"{'modelcache mode=weights':<34} {ms(r['weights_out_s']):>12} {ms(r['weights_in_s']):>12}")
    print(f"{'floor: pinned host->device copy' if gpu else 'floor: host memcpy':<34} {'':>12} {ms(r['floor_s']):>12}")
    print(f"weights swap-in + first run: {ms(r['weights_in_plus_first_run_s'])}; plain run: {ms(r['plain_run_s'])}; "
          f"first weights swap-in (creates the session): {ms(r['weights_first_swap_in_s'])}")
    print(f"ratios: weights in / floor = {r['weights_in_over_floor']:.2f}; set_providers in / weights in = "
          f"{r['set_providers_over_weights_in']:.0f}x; re-create / weights in = {r['recreate_over_weights_in']:.0f}x; "
          f"session in / floor = {r['session_in_over_floor']:.1f}")
    print(f"max |output - plain session|: weights {r['weights_max_abs_diff']:.3g}, session {r['session_max_abs_diff']:.3g}")


if __name__ == "__main__":
    sys.exit(main())
