"""Where a weights-mode run and swap-in spend their time, step by step from a plain session.

    python benchmarks/run_path.py --zoo /tmp/modelcache-zoo --models resnet50,bert-base --runs 300

For each model, these run interleaved (rotating order, medians of ``--runs``), each a step closer
to what modelcache runs:

- ``plain``: ``InferenceSession(path)`` with the device's provider, ``run(None, feed)``;
- ``plain_io``: that session through an IOBinding (inputs bound from numpy, outputs to the CPU);
- ``opt_reload``: the graph ONNX Runtime optimized for the provider, saved and loaded again with
  optimizations off (the weights still constants);
- ``lifted``: that graph with its weights as inputs, the weights on the device bound once;
  ``lifted_env``: the same with the process-wide arena modelcache uses (``session.use_env_allocators``);
  ``lifted_out_dev``: outputs bound to the device, then copied to numpy;
- ``mc``: the model through ``cache.use()`` held once (the caller thread's path); ``mc_direct``:
  its bind-and-run on this thread, without the gate, the working-memory count and the context.

Then ``--swaps`` evict/restore cycles through the cache, each next to a floor sample (allocate,
copy from pinned memory, synchronize) taken in the same cycle; the swap-in's phases (allocation,
copy issue, binding the weights, the final synchronize, the rest) and the first three runs after
it; and the same "new weights buffer, first runs" on the ``lifted`` session without modelcache.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import modelcache as mc  # noqa: E402
import zoo  # noqa: E402

MiB = 1 << 20


def interleaved(steps: Dict[str, Callable[[], Any]], runs: int) -> Dict[str, List[float]]:
    """Seconds of each step's calls: ``runs`` rounds of every step, in an order that rotates from
    one round to the next so that none goes first (or follows a given other) more often."""
    times: Dict[str, List[float]] = {k: [] for k in steps}
    keys = list(steps)
    for i in range(runs):
        for k in range(len(keys)):
            key = keys[(i + k) % len(keys)]
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
    return times


def med(values: List[float]) -> float:
    return statistics.median(values) * 1e3


def lift_weights(proto: Any, min_bytes: int) -> List[Any]:
    """The Weight list (name, dtype, shape) of the float initializers of ``min_bytes`` and more."""
    from onnx import numpy_helper
    from modelcache.backends.onnxruntime.graph import Weight
    out = []
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.nbytes >= min_bytes:
            out.append((Weight(init.name, array.dtype.str, tuple(array.shape), 0, array.nbytes), array))
    return out


def measure(cache: mc.ModelCache, name: str, path: str, gpu: bool, runs: int, swaps: int, folder: str) -> Dict[str, Any]:
    import onnx
    import onnxruntime as ort
    from modelcache.backends.onnxruntime import graph as mgraph
    from modelcache.backends.onnxruntime.sessions import CudaProvider
    row: Dict[str, Any] = {"model": name}
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    mc_providers = CudaProvider(0).providers({}) if gpu else providers
    dev = ("cuda", 0) if gpu else ("cpu", 0)
    plain = ort.InferenceSession(path, providers=providers)
    feed = zoo.sample_feed(plain)
    outs = [o.name for o in plain.get_outputs()]
    expected = plain.run(None, feed)

    # the cache's model, held (its first swap-in makes the env arena exist too)
    cache.register(name, path, backend="onnxruntime")
    lease = cache.use(name, timeout=600)
    held = lease.acquire()
    held.run(None, feed)
    checked = held._checked(feed)

    # the optimized graph, saved and reloaded
    opt = os.path.join(folder, f"{name}-opt.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = opt
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", os.path.basename(opt) + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
    ort.InferenceSession(path, sess_options=so, providers=mc_providers)
    off = ort.SessionOptions()
    off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reload = ort.InferenceSession(opt, sess_options=off, providers=mc_providers)

    proto = onnx.load(opt)
    lifted_w = lift_weights(proto, 64)
    graph_bytes = mgraph.as_inputs(proto, [w for w, _ in lifted_w], generic=True)
    lifted = ort.InferenceSession(graph_bytes, sess_options=off, providers=mc_providers)
    env = ort.SessionOptions()
    env.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    env.add_session_config_entry("session.use_env_allocators", "1")
    lifted_env = ort.InferenceSession(graph_bytes, sess_options=env, providers=mc_providers)
    row["weights"] = len(lifted_w)

    def device_weights() -> List[Any]:
        return [ort.OrtValue.ortvalue_from_numpy(a, dev[0], dev[1]) for _, a in lifted_w]

    def binding_of(session: Any, values: List[Any]) -> Any:
        b = session.io_binding()
        for (w, _), v in zip(lifted_w, values):
            b.bind_ortvalue_input(w.name, v)
        return b

    on_dev = device_weights()
    b_lifted, b_env, b_out = binding_of(lifted, on_dev), binding_of(lifted_env, on_dev), binding_of(lifted, on_dev)
    b_plain = plain.io_binding()

    def io_run(session: Any, b: Any, out_device: str = "cpu") -> Callable[[], Any]:
        def run() -> Any:
            for k, v in feed.items():
                b.bind_cpu_input(k, v)
            for o in outs:
                if out_device == "cpu":
                    b.bind_output(o, "cpu")
                else:
                    b.bind_output(o, dev[0], dev[1])
            session.run_with_iobinding(b)
            r = b.copy_outputs_to_cpu()
            b.clear_binding_outputs()
            return r
        return run

    steps: Dict[str, Callable[[], Any]] = {
        "plain": lambda: plain.run(None, feed),
        "plain_io": io_run(plain, b_plain),
        "opt_reload": lambda: reload.run(None, feed),
        "lifted": io_run(lifted, b_lifted),
        "lifted_env": io_run(lifted_env, b_env),
        "lifted_out_dev": io_run(lifted, b_out, "device"),
        "mc": lambda: held.run(None, feed),
        "mc_direct": lambda: held._bind_and_run(outs, checked, None),
    }
    for key, fn in steps.items():    # every path computes the same thing
        got = fn()
        row[f"dev_{key}"] = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, got))
        for _ in range(5):
            fn()
    times = interleaved(steps, runs)
    base = statistics.median(times["plain"])
    row["run_ms"] = {k: med(v) for k, v in times.items()}
    row["run_ratio"] = {k: statistics.median(v) / base for k, v in times.items()}
    row["run_p10_ms"] = {k: float(np.percentile(v, 10)) * 1e3 for k, v in times.items()}
    lease.release()

    # first runs on a new weights buffer, without modelcache
    firsts: List[List[float]] = []
    for _ in range(min(swaps, 10)):
        values = device_weights()
        b = binding_of(lifted, values)
        fn = io_run(lifted, b)
        seq = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            seq.append(time.perf_counter() - start)
        firsts.append(seq)
    row["lifted_new_buffer_runs_ms"] = [med([s[k] for s in firsts]) for k in range(3)]

    # swaps through the cache, next to a floor sample; the swap-in's phases
    memory = cache.monitor.memory
    phases: Dict[str, float] = {}
    originals = {k: getattr(memory, k) for k in ("allocate", "copy_to_device", "synchronize")}

    def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - start
        return wrapper
    from modelcache.backends.onnxruntime.model import OrtModel
    prime = OrtModel.prime
    pool = memory.new_host_pool()
    weights_bytes = int(cache.info(name).details.get("weights_bytes") or 0)
    block = pool.get(weights_bytes)
    ins, floors, outs_t, seqs, phase_rows = [], [], [], [], []
    for _ in range(swaps):
        start = time.perf_counter()
        cache.evict(name)
        outs_t.append(time.perf_counter() - start)
        floor = zoo.copy_floor(memory, block, weights_bytes)    # the floor, in this cycle (None off a GPU)
        if floor is not None:
            floors.append(floor)
        phases.clear()
        for k, fn in originals.items():
            setattr(memory, k, timed(k, fn))
        OrtModel.prime = timed("prime", prime)   # type: ignore[method-assign]
        try:
            lease = cache.use(name, timeout=600)
            start = time.perf_counter()
            m = lease.acquire()
            ins.append(time.perf_counter() - start)
        finally:
            for k in originals:
                delattr(memory, k)
            OrtModel.prime = prime   # type: ignore[method-assign]
        phase_rows.append(dict(phases))
        seq = []
        for _ in range(3):
            start = time.perf_counter()
            m.run(None, feed)
            seq.append(time.perf_counter() - start)
        seqs.append(seq)
        lease.release()
    pool.put(block)
    pool.close()
    cache.evict(name)
    row["swap_in_ms"] = med(ins)
    row["floor_ms"] = med(floors) if floors else None
    row["swap_ratio"] = statistics.median(ins) / statistics.median(floors) if floors else None
    row["swap_out_ms"] = med(outs_t)
    row["swap_in_phases_ms"] = {k: med([p.get(k, 0.0) for p in phase_rows]) for k in ("allocate", "copy_to_device",
                                                                                      "prime", "synchronize")}
    row["runs_after_swap_in_ms"] = [med([s[k] for s in seqs]) for k in range(3)]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default="/tmp/modelcache-zoo")
    p.add_argument("--models", default="resnet50,mobilenet_v3_large,bert-base,gpt2,vit_b_16")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--swaps", type=int, default=15)
    p.add_argument("--builders", action="store_true", help="the CPU builders (no torch)")
    p.add_argument("--json")
    a = p.parse_args()
    import onnxruntime as ort
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    wanted = [m for m in a.models.split(",") if m]
    if a.builders:
        os.makedirs(a.zoo, exist_ok=True)
        models = [(n, path) for n, path, arch in zoo.build_families(a.zoo) if arch in wanted]
    else:
        models = [(n, path) for n, path, _ in zoo.export_zoo(a.zoo, wanted, False)]
    cache = mc.ModelCache(device=0 if gpu else None, monitor=None if gpu else mc.SimulatedDevice("32GiB"),
                          device_budget="60GiB" if gpu else "30GiB", reserve=0, watch_interval=None)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, path in models:
            try:
                row = measure(cache, name, path, gpu, a.runs, a.swaps, folder)
            except Exception as exc:
                row = {"model": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            rows.append(row)
            print(json.dumps(row, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)), flush=True)
    for row in rows:
        if "error" in row:
            print(f"{row['model']}: {row['error']}")
            continue
        ratios = " ".join(f"{k} {v:.3f}" for k, v in row["run_ratio"].items())
        print(f"{row['model']:<20} {row['weights']:>4} weights  plain {row['run_ms']['plain']:.3f} ms | {ratios}")
        ph = row["swap_in_phases_ms"]
        print(f"{'':<20} swap-in {row['swap_in_ms']:.2f} ms, floor {row['floor_ms'] or 0:.2f} ms "
              f"({row['swap_ratio'] or 0:.2f}x): allocate {ph['allocate']:.2f}, copy issue {ph['copy_to_device']:.2f}, "
              f"prime {ph['prime']:.2f}, sync {ph['synchronize']:.2f}; runs after it "
              f"{', '.join(f'{v:.2f}' for v in row['runs_after_swap_in_ms'])} ms; on a new buffer without the cache "
              f"{', '.join(f'{v:.2f}' for v in row['lifted_new_buffer_runs_ms'])} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": gpu, "device": cache.monitor.name,
                       "onnxruntime": ort.__version__, "rows": rows}, f, indent=1, default=str)
    cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
