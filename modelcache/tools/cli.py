"""``modelcache`` on the command line: demo, stress, bench, status, convert."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import ConfigError, ModelCacheError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help where X says something (not None, False or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default in ("", ()):
            return action.help or ""
        return super()._get_help_string(action) or ""


STRESS_EPILOG = """sizes: on a GPU, --models, --min-size, --max-size and --budget default to 40, 64MiB, 1GiB and
8GiB (about 15 GiB of model files). Simulated (--simulate, or no GPU found), those not given are
chosen to keep the model files within min(2 GiB, 10% of the free disk under --models-dir, 10% of
the RAM): 40 models scaled down, with the budget 8 x the largest; the run logs what it chose."""


def build_parser() -> argparse.ArgumentParser:
    """The ``modelcache`` argument parser (every subcommand's help shows its options' defaults)."""
    from .. import __version__
    parser = argparse.ArgumentParser(prog="modelcache", description="Hold more models than fit on the GPU.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"modelcache {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an error (also: MODELCACHE_TRACEBACK=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter, **kwargs)
        cmd.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error (also: MODELCACHE_TRACEBACK=1)")
        return cmd

    demo = command("demo", "a stress run of a minute or two on generated models (the README's main job)")
    demo.add_argument("--out", default="modelcache-demo", help="folder for results.json, plot.png and the models")
    demo.add_argument("--requests", type=int, default=6000,
                      help="requests modelcache serves (the baselines serve a sixth)")
    demo.add_argument("--simulate", action="store_true", help="a simulated device even where a GPU is present")

    stress = command("stress", "the same trace through modelcache (each policy) and the baselines",
                     epilog=STRESS_EPILOG)
    stress.add_argument("--models", type=int, help="generated models (default: 40; simulated: see sizes below)")
    stress.add_argument("--min-size", help="smallest generated model (default: 64MiB; simulated: see sizes below)")
    stress.add_argument("--max-size", help="largest generated model; sizes spread log-uniformly between, equal "
                                           "to --min-size: fixed (default: 1GiB; simulated: see sizes below)")
    stress.add_argument("--layers", type=int, default=4, help="layers of each generated model")
    stress.add_argument("--model-files", nargs="*", default=(), help="your own .onnx files instead")
    stress.add_argument("--families", type=int, default=0,
                        help="this many generated models of several architectures (CPU builders) instead")
    stress.add_argument("--zoo", help="the models benchmarks/zoo.py exported into this folder instead")
    stress.add_argument("--budget-of-weights", type=float,
                        help="the budget as a fraction of all models' weights (e.g. 0.45), instead of --budget")
    stress.add_argument("--no-prepare", action="store_true",
                        help="modelcache: leave each model's first swap-in (its check) to the timed run")
    stress.add_argument("--workload", default="zipf", help="zipf, uniform, or a trace file (a model name a line)")
    stress.add_argument("--zipf-s", type=float, default=1.1, help="the Zipf exponent")
    stress.add_argument("--requests", type=int, default=10000, help="requests in the trace")
    stress.add_argument("--threads", type=int, default=16, help="threads sending requests")
    stress.add_argument("--budget", help="device memory modelcache may use (default: 8GiB; simulated: 8 x "
                                         "--max-size, see sizes below)")
    stress.add_argument("--reserve", default="0", help="device memory modelcache leaves free")
    stress.add_argument("--policies", default="lru,lfu,cost", help="modelcache's eviction policies, one run each")
    stress.add_argument("--baselines", default="lru-count,naive", help="baselines to run, of lru-count and naive")
    stress.add_argument("--baseline-requests", type=int,
                        help="serve only this prefix of the trace for baselines (default: all of it)")
    stress.add_argument("--naive-requests", type=int, help="a shorter prefix for naive (default: --baseline-requests)")
    stress.add_argument("--max-swap-ins", type=int, help="modelcache: most swap-ins in flight (default: no limit)")
    stress.add_argument("--sim-link", type=float, help="simulated device: host->device GB/s (default: free copies)")
    stress.add_argument("--sim-session-overhead", default="0", help="simulated device: bytes a session costs")
    stress.add_argument("--sim-run-overhead", default="0",
                        help="simulated device: bytes a run takes (a stock session keeps them, as its arena does)")
    stress.add_argument("--sim-arena-keeps", type=float,
                        help="simulated device: runs' working memory stays in an arena until shrunk, which gives "
                             "back all but this share of it (0-1; default: no arena)")
    stress.add_argument("--simulate", action="store_true", help="a simulated device even where a GPU is present")
    stress.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of ONNX Runtime's CUDA provider for every contender (repeatable)")
    stress.add_argument("--device-total", help="simulated device size (default: 4 x budget)")
    stress.add_argument("--models-dir", help="where generated models are kept, reused across runs "
                                             "(default: ~/.cache/modelcache/stress-models)")
    stress.add_argument("--seed", type=int, default=0, help="seed of the models and the trace")
    stress.add_argument("--json", help="write the report here")
    stress.add_argument("--plot", help="write the PNG here")
    stress.add_argument("--no-progress", action="store_true",
                        help="no progress bars (shown on stderr when it is a terminal)")

    bench = command("bench", "swap-in and swap-out times of your model files (exit status 1 if one failed)")
    bench.add_argument("models", nargs="+", help=".onnx or .plan files")
    bench.add_argument("--cycles", type=int, default=5, help="timed swap-in/swap-out cycles per model (the median)")
    bench.add_argument("--simulate", action="store_true", help="a simulated device even where a GPU is present")

    status = command("status", "GPUs from NVML, and a cache's entries from a status file")
    status.add_argument("--cache", help="a JSON file written by ModelCache.dump_status(path)")

    convert = command("convert", "build a TensorRT plan from an ONNX model through the build cache "
                                 "(trtexec-like options)")
    convert.add_argument("onnx", help="path to the .onnx model")
    convert.add_argument("--out", default="~/.cache/modelcache/tensorrt-plans", help="build cache folder")
    convert.add_argument("--fp16", action="store_true", help="allow FP16 kernels")
    convert.add_argument("--workspace", help="workspace memory pool limit, e.g. 1GiB (default: TensorRT's)")
    convert.add_argument("--minShapes", default="", help="smallest input shapes, e.g. x:1x3x224x224")
    convert.add_argument("--optShapes", default="", help="input shapes to optimize for")
    convert.add_argument("--maxShapes", default="", help="largest input shapes")
    convert.add_argument("--trt-module", help="tensorrt or tensorrt_rtx_bindings (default: the first that imports)")
    convert.add_argument("--compute-capability", help="TensorRT-RTX target, e.g. SM89")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a ``modelcache`` command; returns the exit status: 0 done, 1 the work failed (a stress
    or demo request, a bench model), 2 a usage or input error (one line on stderr)."""
    args = build_parser().parse_args(argv)
    commands: Dict[str, Callable[[argparse.Namespace], int]] = {
        "demo": _demo, "stress": _stress, "bench": _bench, "status": _status, "convert": _convert}
    try:
        return commands[args.command](args)
    except (ModelCacheError, OSError) as exc:
        if args.traceback or os.environ.get("MODELCACHE_TRACEBACK") == "1":
            raise
        print(f"modelcache {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modelcache {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The error as one line; an OSError as "file: cause"."""
    if isinstance(exc, OSError) and exc.strerror:
        text = (f"{exc.filename}: " if exc.filename else "") + exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(args.out, args.simulate, args.requests)


def _key_values(items: List[str], flag: str, refused: Tuple[str, ...] = ()) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        if key in out:
            raise ConfigError(f"{flag} {key} given twice ({out[key]!r}, {value!r})")
        if key in refused:
            raise ConfigError(f"{flag} {key}: set by modelcache itself; not an option here")
        out[key] = value
    return out


def _stress(args: argparse.Namespace) -> int:
    from .stress import StressConfig, failed, run_stress, save_json   # models/sizes None: sized by run_stress
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
                          session_overhead=args.sim_session_overhead, run_overhead=args.sim_run_overhead,
                          arena_keeps=args.sim_arena_keeps,
                          provider_options=_key_values(args.provider_option, "--provider-option", ("device_id",)),
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
    """A row per model variant; exit status 1 if any variant failed."""
    import statistics
    import time
    from ..cache import ModelCache
    from ..devices import NvmlMonitor, SimulatedDevice
    from ..sizes import format_bytes
    from ..tiers import Tier
    for path in args.models:
        if not os.path.exists(path):
            raise ConfigError(f"no file at {path}")
    if args.cycles < 1:
        raise ConfigError(f"--cycles={args.cycles} is too small; use 1 or more")
    rows = [f"{'model':<32} {'backend':<12} {'mode':<8} {'size':>10} {'swap-in ms':>11} {'swap-out ms':>12}"]
    monitor = None
    if not args.simulate:
        try:
            NvmlMonitor().close()
        except ModelCacheError:
            monitor = SimulatedDevice("64GiB")
    else:
        monitor = SimulatedDevice("64GiB")
    failures = runs = 0
    for path in args.models:
        variants: List[Tuple[str, Dict[str, Any]]] = \
            [("onnxruntime", {"mode": "weights"}), ("onnxruntime", {"mode": "session"})] \
            if path.endswith(".onnx") else [("tensorrt", {})]
        for backend, options in variants:
            runs += 1
            with ModelCache(monitor=monitor, reserve=0, watch_interval=None) as cache:
                try:
                    cache.register("m", path, backend=backend, **options)
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
                except Exception as exc:     # a row, not the end of the bench; counted in the exit status
                    failures += 1
                    why = str(exc) if isinstance(exc, ModelCacheError) else f"{type(exc).__name__}: {exc}"
                    rows.append(f"{os.path.basename(path)[:32]:<32} {backend:<12} {options.get('mode', '-'):<8} "
                                f"failed: {' '.join(why.split())[:300]}")
    print("\n".join(rows))
    if failures:
        print(f"modelcache bench: {failures} of {runs} runs failed", file=sys.stderr)
    return 1 if failures else 0


def _status(args: argparse.Namespace) -> int:
    from .status import cache_table, gpu_table, read_status
    table = cache_table(read_status(args.cache), source=args.cache) if args.cache else []
    print("\n".join(gpu_table() + table))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..backends.tensorrt.build import BuildCache, profiles_from_shapes
    options = {"fp16": args.fp16, "workspace": args.workspace,
               "profiles": profiles_from_shapes(args.minShapes, args.optShapes, args.maxShapes),
               "compute_capability": args.compute_capability}
    cache = BuildCache(os.path.expanduser(args.out), args.trt_module)
    plan, sidecar, hit = cache.get(args.onnx, options)
    what = "cache hit" if hit else f"built in {sidecar.get('build_seconds', 0):.2f} s"
    print(f"{what}: {plan} ({os.path.getsize(plan)} B, {sidecar['trt_module']} {sidecar['trt_version']})")
    print(f"sidecar: {plan}.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
