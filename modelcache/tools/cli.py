"""``modelcache`` on the command line: demo, stress, bench, status, convert."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from ..errors import ModelCacheError


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="modelcache", description="Hold more models than fit on the GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a stress run of a minute or two on generated models (the README's main job)")
    demo.add_argument("--out", default="modelcache-demo", help="folder for results.json, plot.png and the models")
    demo.add_argument("--requests", type=int, default=6000, help="requests modelcache serves (default 6000; the baselines a sixth)")
    demo.add_argument("--simulate", action="store_true", help="a simulated device even where a GPU is present")

    stress = sub.add_parser("stress", help="the same trace through modelcache (each policy) and the baselines")
    stress.add_argument("--models", type=int, default=40, help="generated models (default 40)")
    stress.add_argument("--min-size", default="64MiB")
    stress.add_argument("--max-size", default="1GiB", help="sizes spread log-uniformly; equal to --min-size: fixed")
    stress.add_argument("--layers", type=int, default=4)
    stress.add_argument("--model-files", nargs="*", default=(), help="your own .onnx files instead")
    stress.add_argument("--families", type=int, default=0,
                        help="this many generated models of several architectures (CPU builders) instead")
    stress.add_argument("--zoo", help="the models benchmarks/zoo.py exported into this folder instead")
    stress.add_argument("--budget-of-weights", type=float,
                        help="the budget as a fraction of all models' weights (e.g. 0.45), instead of --budget")
    stress.add_argument("--no-prepare", action="store_true",
                        help="modelcache: leave each model's first swap-in (its check) to the timed run")
    stress.add_argument("--workload", default="zipf", help="zipf, uniform, or a trace file (a model name a line)")
    stress.add_argument("--zipf-s", type=float, default=1.1)
    stress.add_argument("--requests", type=int, default=10000)
    stress.add_argument("--threads", type=int, default=16)
    stress.add_argument("--budget", default="8GiB")
    stress.add_argument("--reserve", default="0")
    stress.add_argument("--policies", default="lru,lfu,cost")
    stress.add_argument("--baselines", default="lru-count,naive")
    stress.add_argument("--baseline-requests", type=int, help="serve only this prefix of the trace for baselines")
    stress.add_argument("--naive-requests", type=int, help="a shorter prefix for naive (default: --baseline-requests)")
    stress.add_argument("--max-swap-ins", type=int, help="modelcache: most swap-ins in flight (default: no limit)")
    stress.add_argument("--sim-link", type=float, help="simulated device: host->device GB/s (default: free copies)")
    stress.add_argument("--sim-session-overhead", default="0", help="simulated device: bytes a session costs")
    stress.add_argument("--simulate", action="store_true")
    stress.add_argument("--device-total", help="simulated device size (default 4 x budget)")
    stress.add_argument("--models-dir", help="where generated models are kept (reused across runs)")
    stress.add_argument("--seed", type=int, default=0)
    stress.add_argument("--json", help="write the report here")
    stress.add_argument("--plot", help="write the PNG here")
    stress.add_argument("--no-progress", action="store_true")

    bench = sub.add_parser("bench", help="swap-in and swap-out times of your model files")
    bench.add_argument("models", nargs="+", help=".onnx or .plan files")
    bench.add_argument("--cycles", type=int, default=5)
    bench.add_argument("--simulate", action="store_true")

    status = sub.add_parser("status", help="GPUs from NVML, and a cache's entries from a status file")
    status.add_argument("--cache", help="a JSON file written by ModelCache.dump_status(path)")

    convert = sub.add_parser("convert", help="build a TensorRT plan from an ONNX model through the build cache "
                                             "(trtexec-like options)")
    convert.add_argument("onnx", help="path to the .onnx model")
    convert.add_argument("--out", default=os.path.expanduser("~/.cache/modelcache/tensorrt-plans"),
                         help="build cache folder (default ~/.cache/modelcache/tensorrt-plans)")
    convert.add_argument("--fp16", action="store_true")
    convert.add_argument("--workspace", help="workspace memory pool limit, e.g. 1GiB")
    convert.add_argument("--minShapes", default="", help="e.g. x:1x3x224x224")
    convert.add_argument("--optShapes", default="")
    convert.add_argument("--maxShapes", default="")
    convert.add_argument("--trt-module", help="tensorrt (default) or tensorrt_rtx_bindings")
    convert.add_argument("--compute-capability", help="TensorRT-RTX target, e.g. SM89")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(args.out, args.simulate, args.requests)
        if args.command == "stress":
            return _stress(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "status":
            return _status(args)
        return _convert(args)
    except ModelCacheError as exc:
        print(f"modelcache {args.command}: {exc}", file=sys.stderr)
        return 1


def _stress(args: argparse.Namespace) -> int:
    from .stress import StressConfig, failed, run_stress, save_json
    from .stress.report import emit, plot
    config = StressConfig(models=args.models, min_size=args.min_size, max_size=args.max_size, layers=args.layers,
                          model_files=args.model_files, families=args.families, zoo=args.zoo,
                          budget_of_weights=args.budget_of_weights, prepare=not args.no_prepare,
                          workload=args.workload, zipf_s=args.zipf_s,
                          requests=args.requests, threads=args.threads, budget=args.budget, reserve=args.reserve,
                          policies=[p for p in args.policies.split(",") if p],
                          baselines=[b for b in args.baselines.split(",") if b],
                          baseline_requests=args.baseline_requests, naive_requests=args.naive_requests,
                          simulate=args.simulate, max_swap_ins=args.max_swap_ins,
                          link_bytes_per_s=args.sim_link * 1e9 if args.sim_link else None,
                          session_overhead=args.sim_session_overhead,
                          device_total=args.device_total, models_dir=args.models_dir, seed=args.seed,
                          progress=not args.no_progress)
    report = run_stress(config)
    emit(report)
    if args.json:
        save_json(report, args.json)
        print(f"JSON: {args.json}")
    if args.plot:
        try:
            plot(report, args.plot)
            print(f"plot: {args.plot}")
        except ImportError:
            print("plot: skipped (matplotlib is not installed: pip install 'modelcache[plot]')")
    return 1 if failed(report) else 0


def _bench(args: argparse.Namespace) -> int:
    import statistics
    import time
    from ..cache import ModelCache
    from ..devices import NvmlMonitor, SimulatedDevice
    from ..sizes import format_bytes
    from ..tiers import Tier
    rows = [f"{'model':<32} {'backend':<12} {'mode':<8} {'size':>10} {'swap-in ms':>11} {'swap-out ms':>12}"]
    monitor = None
    if not args.simulate:
        try:
            NvmlMonitor().close()
        except ModelCacheError:
            monitor = SimulatedDevice("64GiB")
    else:
        monitor = SimulatedDevice("64GiB")
    for path in args.models:
        if not os.path.exists(path):
            raise ModelCacheError(f"no file at {path}")
        variants = [("onnxruntime", {"mode": "weights"}), ("onnxruntime", {"mode": "session"})] \
            if path.endswith(".onnx") else [("tensorrt", {})]
        for backend, options in variants:
            with ModelCache(monitor=monitor, reserve=0, watch_interval=None) as cache:
                cache.register("m", path, backend=backend, **options)
                try:
                    cache.prefetch("m", tier=Tier.HOST).result()
                    ins, outs = [], []
                    for _ in range(args.cycles + 1):
                        lease = cache.use("m")
                        start = time.perf_counter()
                        lease.acquire()
                        ins.append(time.perf_counter() - start)
                        lease.release()
                        start = time.perf_counter()
                        cache.evict("m")
                        outs.append(time.perf_counter() - start)
                    info = cache.info("m")
                    rows.append(f"{os.path.basename(path)[:32]:<32} {backend:<12} {info.details.get('mode', '-'):<8} "
                                f"{format_bytes(info.host_bytes):>10} {statistics.median(ins[1:]) * 1e3:>11.2f} "
                                f"{statistics.median(outs[1:]) * 1e3:>12.2f}")
                except ModelCacheError as exc:
                    rows.append(f"{os.path.basename(path)[:32]:<32} {backend:<12} {options.get('mode', '-'):<8} "
                                f"failed: {exc}")
    print("\n".join(rows))
    return 0


def _status(args: argparse.Namespace) -> int:
    from .status import gpu_table, cache_table
    print("\n".join(gpu_table()))
    if args.cache:
        with open(args.cache) as f:
            print("\n".join(cache_table(json.load(f))))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..backends.tensorrt.build import BuildCache, profiles_from_shapes
    options = {"fp16": args.fp16, "workspace": args.workspace,
               "profiles": profiles_from_shapes(args.minShapes, args.optShapes, args.maxShapes),
               "compute_capability": args.compute_capability}
    cache = BuildCache(args.out, args.trt_module)
    plan, sidecar, hit = cache.get(args.onnx, options)
    what = "cache hit" if hit else f"built in {sidecar.get('build_seconds', 0):.2f} s"
    print(f"{what}: {plan} ({os.path.getsize(plan)} B, {sidecar['trt_module']} {sidecar['trt_version']})")
    print(f"sidecar: {plan}.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
