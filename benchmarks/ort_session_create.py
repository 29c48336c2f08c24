"""How fast can an ONNX Runtime session be created on the device? Strategies side by side.

    python benchmarks/ort_session_create.py [--mib 512] [--repeat 3]

For a generated model of ``--mib`` MiB: a plain .onnx with embedded weights (as the seed's
``InferenceSession("model.onnx")``), an external-data file, graph optimizations off, weights
handed over from memory (pageable or pinned), and an optimized graph saved once. Prints the
median creation time of each (ms). Used to choose mode="session"'s restore path.
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
from modelcache.tools.generate import make_mlp, save_model  # noqa: E402


def relocated(onnx, path: str, location: str) -> bytes:
    """The graph at ``path`` (weights not loaded), its external data renamed to ``location``."""
    graph = onnx.load(path, load_external_data=False)
    for init in graph.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    return graph.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="CPU provider even where CUDA exists")
    args = parser.parse_args()
    import onnx
    import onnxruntime as ort
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    gpu = not args.cpu and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ([("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})] if gpu else []) + \
        ["CPUExecutionProvider"]
    hidden = int(round((args.mib * 2**20 / 4 / 8) ** 0.5))
    d = tempfile.mkdtemp(prefix="ort-create-")
    embedded = save_model(make_mlp(hidden, 8, bias=False, batch=1), os.path.join(d, "embedded.onnx"))
    external = save_model(make_mlp(hidden, 8, bias=False, batch=1), os.path.join(d, "external.onnx"),
                          external_data=True)
    data = open(external + ".data", "rb").read()
    graph_bytes = relocated(onnx, external, "w.bin")
    pageable = np.frombuffer(data, np.uint8).copy()
    pinned = None
    if gpu:
        from modelcache.devices.cuda import PinnedPool
        pool = PinnedPool()
        block = pool.get(len(data))
        block.array[:len(data)] = pageable
        pinned = block.array[:len(data)]

    def opts(disable=False, memory=None, save=None):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if disable:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if memory is not None:
            so.add_external_initializers_from_files_in_memory(["w.bin"], [memory], [len(data)])
        if save:
            so.optimized_model_filepath = save
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        return so

    opt_path = os.path.join(d, "opt.onnx")
    ort.InferenceSession(graph_bytes, opts(memory=pageable, save=opt_path), providers=providers)
    opt_bytes = relocated(onnx, opt_path, "w.bin")
    opt_data = np.frombuffer(open(os.path.join(d, "opt.data"), "rb").read(), np.uint8).copy()

    def opt_mem():
        so = opts(disable=True)
        so.add_external_initializers_from_files_in_memory(["w.bin"], [opt_data], [len(opt_data)])
        return ort.InferenceSession(opt_bytes, so, providers=providers)

    cases = {
        "embedded file, default (the seed)": lambda: ort.InferenceSession(embedded, providers=providers),
        "external-data file, default": lambda: ort.InferenceSession(external, providers=providers),
        "external-data file, optimizations off": lambda: ort.InferenceSession(external, opts(True), providers=providers),
        "in-memory weights (pageable), default": lambda: ort.InferenceSession(graph_bytes, opts(memory=pageable),
                                                                              providers=providers),
        "in-memory weights (pageable), opts off": lambda: ort.InferenceSession(graph_bytes, opts(True, pageable),
                                                                               providers=providers),
        "optimized graph file, opts off": lambda: ort.InferenceSession(opt_path, opts(True), providers=providers),
        "optimized graph in memory, opts off": opt_mem,
    }
    if pinned is not None:
        cases["in-memory weights (pinned), opts off"] = lambda: ort.InferenceSession(
            graph_bytes, opts(True, pinned), providers=providers)
    print(f"{'GPU' if gpu else 'CPU'}; onnxruntime {ort.__version__}; {len(data) / 2**20:.0f} MiB model")
    for label, create in cases.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            session = create()
            times.append(time.perf_counter() - start)
            del session
        print(f"{label:<42} median {statistics.median(times) * 1e3:8.1f} ms  (min {min(times) * 1e3:.1f})", flush=True)


if __name__ == "__main__":
    main()
