"""``modelcache`` on the command line. ``modelcache demo`` is the README's main job."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .demo import run_demo
from .errors import ModelCacheError


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="modelcache", description="Hold more models than fit on the GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="register generated models and serve a skewed workload from threads, "
                                       "showing loads, hits and evictions")
    demo.add_argument("--models", type=int, default=12, help="number of generated models (default 12)")
    demo.add_argument("--requests", type=int, default=2000, help="requests in all (default 2000)")
    demo.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    demo.add_argument("--policy", default="lru", choices=["lru", "lfu", "cost"])
    demo.add_argument("--simulate", action="store_true",
                      help="use a simulated device even where a GPU is present")
    demo.add_argument("--seed", type=int, default=0)
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
    if args.command == "convert":
        return _convert(args)
    if args.command == "demo":
        return run_demo(models=args.models, requests=args.requests, threads=args.threads, policy=args.policy,
                        simulate=args.simulate, seed=args.seed)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _convert(args: argparse.Namespace) -> int:
    from .backends.tensorrt_build import BuildCache, profiles_from_shapes
    try:
        options = {"fp16": args.fp16, "workspace": args.workspace,
                   "profiles": profiles_from_shapes(args.minShapes, args.optShapes, args.maxShapes),
                   "compute_capability": args.compute_capability}
        cache = BuildCache(args.out, args.trt_module, simulated=False)
        plan, sidecar, hit = cache.get(args.onnx, options)
    except ModelCacheError as exc:
        print(f"modelcache convert: {exc}", file=sys.stderr)
        return 1
    what = "cache hit" if hit else f"built in {sidecar.get('build_seconds', 0):.2f} s"
    print(f"{what}: {plan} ({os.path.getsize(plan)} B, {sidecar['trt_module']} {sidecar['trt_version']})")
    print(f"sidecar: {plan}.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
