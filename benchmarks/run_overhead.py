"""The cache's Python around one run: ``cache.use()``'s model ``run()`` against its bind-and-run
and against ONNX Runtime's bare ``run_with_iobinding`` on a prepared binding, on a model whose
run is short (4 x MatMul 512x512), so what is measured is the cache's own per-run work.

    python benchmarks/run_overhead.py --runs 5000

Runs on the CPU with a simulated device, or on a GPU (``--gpu``). Prints medians of interleaved
runs in microseconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import modelcache as mc  # noqa: E402


def build(path: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(4):
        inits.append(numpy_helper.from_array((rng.random((512, 512)) * 0.01).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8          # what older ONNX Runtime releases read too
    onnx.save(model, path)


def tiny_cache(folder: str, gpu: bool):
    """A cache on the GPU (or a simulated device) with the short model registered as "m", and its
    input: what this benchmark and ``run_pieces.py`` time."""
    path = os.path.join(folder, "tiny.onnx")
    build(path)
    cache = mc.ModelCache(device=0 if gpu else None, monitor=None if gpu else mc.SimulatedDevice("32GiB"),
                          device_budget="30GiB", reserve=0, watch_interval=None)
    cache.register("m", path, backend="onnxruntime", session_options={"intra_op_num_threads": 1})
    return cache, {"x": np.random.default_rng(1).random((1, 512)).astype(np.float32)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5000)
    p.add_argument("--gpu", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cache, feed = tiny_cache(folder, a.gpu)
        with cache.use("m") as held:
            held.run(None, feed)
            print(f"mode {cache.info('m').details['mode']}, {len(held._weights)} weights")
            outs = [o.name for o in held.get_outputs()]
            binding = held._new_binding()
            binding.bind_cpu_input("x", feed["x"])
            binding.bind_output(outs[0], "cpu")
            session = held._session
            steps = {"use().run": lambda: held.run(None, feed),
                     "bind_and_run": lambda: held._bind_and_run(outs, feed, None),
                     "bare run_with_iobinding": lambda: session.run_with_iobinding(binding)}
            times = {k: [] for k in steps}
            for _ in range(a.runs):
                for key, fn in steps.items():
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
        for key, v in times.items():
            print(f"{key:<24} {statistics.median(v) * 1e6:8.1f} us")
        bare = statistics.median(times["bare run_with_iobinding"])
        print(f"the cache's Python around a run: {(statistics.median(times['use().run']) - bare) * 1e6:.1f} us")
        cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
