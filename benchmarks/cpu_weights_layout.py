"""What weights mode costs on ONNX Runtime's CPU provider, and what the transposed layout wins back.

    python benchmarks/cpu_weights_layout.py [--families bert,resnet,mobilenet] [--runs 150] [--json F]

For each CPU builder (``modelcache/tools/families.py``, "medium"), medians of interleaved runs
(rotating order), as ratios to a plain session made as a user would:
- ``plain, no pre-packing``: the plain session with ``session.disable_prepacking``: what a run
  costs when the CPU provider packs MatMul/Gemm weights on every run, as it must for weights
  that are graph inputs;
- ``modelcache``: weights mode as it runs (matrix-multiplication weights stored transposed);
- ``modelcache, as optimized``: weights mode with the graph's weights in the layout ONNX Runtime
  optimized them to (``CpuProvider.transposed_matmul_weights`` off).
One intra-op thread everywhere (2-core machines are noisy with more).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Callable, Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import run_path  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="bert,resnet,mobilenet")
    p.add_argument("--runs", type=int, default=150)
    p.add_argument("--json", help="write the ratios here")
    a = p.parse_args()
    import onnxruntime as ort

    import modelcache as mc
    from modelcache.backends.onnxruntime.sessions import CpuProvider
    from modelcache.tools.families import make_family, sample_input

    def plain(model: bytes, **config: str) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        for key, value in config.items():
            so.add_session_config_entry(key, value)
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    def held(model: bytes, transposed: bool) -> Any:
        cache = mc.ModelCache(monitor=mc.SimulatedDevice("4GiB"), reserve=0, watch_interval=None)
        cache.register("m", model, backend="onnxruntime", session_options={"intra_op_num_threads": 1})
        CpuProvider.transposed_matmul_weights = transposed      # read at the first swap-in
        try:
            lease = cache.use("m")
            served = lease.acquire()
        finally:
            CpuProvider.transposed_matmul_weights = True
        caches.append((cache, lease))
        return served

    caches: List[Any] = []
    results: Dict[str, Dict[str, float]] = {}
    print(f"onnxruntime {ort.__version__}; medians of {a.runs} interleaved runs, ratios to the plain session")
    for family in a.families.split(","):
        proto = make_family(family, "medium", seed=0)
        model, feed = proto.SerializeToString(), sample_input(proto)
        runners: Dict[str, Callable[[], Any]] = {}
        for label, session in (("plain", plain(model)),
                               ("plain, no pre-packing", plain(model, **{"session.disable_prepacking": "1"})),
                               ("modelcache", held(model, True)),
                               ("modelcache, as optimized", held(model, False))):
            runners[label] = (lambda s: lambda: s.run(None, feed))(session)
        outputs = {label: run()[0] for label, run in runners.items()}
        assert np.std(outputs["plain"]) > 0
        for label, out in outputs.items():
            np.testing.assert_allclose(out, outputs["plain"], rtol=1e-4, atol=1e-4 * float(np.abs(out).max()))
        times = run_path.interleaved(runners, a.runs)
        labels = list(runners)
        base = statistics.median(times["plain"])
        results[family] = {label: statistics.median(t) / base for label, t in times.items()}
        results[family]["plain_ms"] = base * 1e3
        print(f"{family:<10} plain {base * 1e3:6.2f} ms  " +
              "  ".join(f"{label} {results[family][label]:.3f}x" for label in labels[1:]), flush=True)
        for cache, lease in caches:
            lease.release()
            cache.close()
        caches.clear()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"onnxruntime": ort.__version__, "runs": a.runs, "ratios": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
