"""Soak: many evict/restore cycles of one model (does memory drift?), then a long oversubscribed load.

On a GPU machine with onnxruntime-gpu and the zoo exported (``python benchmarks/zoo.py --export-only``):

    python benchmarks/soak.py --zoo /tmp/zoo --cycles 1000 --requests 10000 --threads 16 --json soak.json

1. ``--cycles`` evict/restore cycles of ``--model`` (default resnet50): evicted to host memory, every
   ``--disk-every``-th cycle to disk, brought back by a lease, run, and the output checked against a
   plain session's (outputs that vary). The process's device memory (NVML, per process) is read with
   the model parked after ``--warmup`` cycles and every 50 cycles after: drift = the largest reading
   minus the first; host RSS likewise.
2. ``--requests`` requests from ``--threads`` threads over the zoo (Zipf, s = 1.1) with a budget of
   1 / ``--oversubscription`` of all models' weights (``modelcache stress``, modelcache with LRU only);
   models larger than the budget are left out. Every output is checked.

Goals (exit 1 if one is missed): drift <= 64 MiB; no output wrong, no OOM, no error in either part.
Without a GPU the CPU builders run on a simulated device (drift: the simulated device's bytes in use).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import modelcache as mc  # noqa: E402
from modelcache.tools.stress import StressConfig, failed, run_stress  # noqa: E402
from modelcache.tools.stress.models import output_ok  # noqa: E402
from modelcache.tools.stress.report import emit  # noqa: E402

MiB = 1 << 20
DRIFT_GOAL = 64 * MiB


def _rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def cycles(path: str, name: str, count: int, warmup: int, disk_every: int, gpu: bool) -> Dict[str, Any]:
    """Evict/restore ``count`` times; device and host bytes read with the model parked."""
    import onnxruntime as ort
    sys.path.insert(0, os.path.dirname(__file__))
    from zoo import sample_feed
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    plain = ort.InferenceSession(path, providers=providers)
    feed = sample_feed(plain)
    expected = plain.run(None, feed)[0]
    del plain
    gc.collect()
    if float(np.std(expected)) == 0:
        raise SystemExit(f"{name}: the reference output is constant; the check would prove nothing")
    disk = tempfile.mkdtemp(prefix="modelcache-soak-")
    monitor = None if gpu else mc.SimulatedDevice("8GiB", session_overhead="1MiB")
    cache = mc.ModelCache(device=0 if gpu else None, monitor=monitor, device_budget="8GiB", reserve=0,
                          disk_dir=disk, watch_interval=None)
    cache.register(name, path, backend="onnxruntime")

    def device_bytes() -> int:
        if gpu:
            return int(cache.monitor.process_bytes() or 0)
        return int(cache.monitor.total_bytes() - cache.monitor.free_bytes())

    ins: List[float] = []
    outs: List[float] = []
    wrong = 0
    samples: List[Dict[str, Any]] = []
    started = time.perf_counter()
    traced = os.environ.get("SOAK_TRACEMALLOC")      # diagnostic: where Python's own allocations grow
    objects = 0
    for i in range(warmup + count):
        if traced and i == warmup:
            import tracemalloc
            gc.collect()
            objects = len(gc.get_objects())
            tracemalloc.start(10)
            first_snapshot = tracemalloc.take_snapshot()
        with cache.use(name, timeout=600) as model:
            got = model.run(None, feed)[0]
        wrong += not output_ok(got, expected)
        tier = mc.Tier.DISK if disk_every and i % disk_every == disk_every - 1 else mc.Tier.HOST
        start = time.perf_counter()
        cache.evict(name, tier=tier)
        outs.append(time.perf_counter() - start)
        if i >= warmup and (i - warmup) % 50 == 0 or i == warmup + count - 1:
            samples.append({"cycle": i - warmup, "device_bytes": device_bytes(), "rss_bytes": _rss()})
        start = time.perf_counter()
        lease = cache.use(name, timeout=600)
        lease.acquire()
        ins.append(time.perf_counter() - start)
        lease.release()
    seconds = time.perf_counter() - started
    if traced:
        gc.collect()
        print(f"python objects: {objects} -> {len(gc.get_objects())}", flush=True)
        for stat in tracemalloc.take_snapshot().compare_to(first_snapshot, "traceback")[:4]:
            print(stat, "\n   ", "\n    ".join(stat.traceback.format()[-6:]), flush=True)
        tracemalloc.stop()
    stats = cache.stats()
    cache.close()
    first = samples[0]
    drift = max(s["device_bytes"] for s in samples) - first["device_bytes"]
    rss_drift = max(s["rss_bytes"] for s in samples) - first["rss_bytes"]
    return {"model": name, "cycles": count, "warmup": warmup, "disk_every": disk_every, "seconds": seconds,
            "wrong": wrong, "drift_bytes": drift, "final_drift_bytes": samples[-1]["device_bytes"] - first["device_bytes"],
            "rss_drift_bytes": rss_drift, "swap_in_ms_median": statistics.median(ins[warmup:]) * 1e3,
            "swap_out_ms_median": statistics.median(outs[warmup:]) * 1e3, "samples": samples,
            "stats": {k: v for k, v in stats.items() if k.startswith(("swap", "evictions", "errors", "device."))}}


def fitting_zoo(folder: str, oversubscription: float) -> str:
    """A folder of links to the zoo's models, the largest left out while it exceeds the budget."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".onnx"))
    size = {f: sum(os.path.getsize(os.path.join(folder, g)) for g in (f, f + ".data")
                   if os.path.exists(os.path.join(folder, g))) for f in files}
    while files and max(size[f] for f in files) > sum(size[f] for f in files) / oversubscription:
        largest = max(files, key=lambda f: size[f])
        arch = largest[:-5].split("-ft")[0]
        files = [f for f in files if f[:-5].split("-ft")[0] != arch]     # the architecture and its fine-tunes
    if not files:
        raise SystemExit(f"no model of {folder} fits 1/{oversubscription:g} of the models' weights")
    out = tempfile.mkdtemp(prefix="modelcache-soak-zoo-")
    for f in files:
        for g in (f, f + ".data"):
            if os.path.exists(os.path.join(folder, g)):
                os.symlink(os.path.join(os.path.abspath(folder), g), os.path.join(out, g))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default="/tmp/modelcache-zoo", help="folder of the exported zoo (CPU: the builders' models)")
    p.add_argument("--model", default="resnet50", help="the model of the cycles (CPU default: resnet)")
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--disk-every", type=int, default=10, help="every Nth eviction goes to disk (0: never)")
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--oversubscription", type=float, default=5.0, help="all models' weights / the budget")
    p.add_argument("--skip-cycles", action="store_true")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--json", help="write the summary here")
    a = p.parse_args()
    import onnxruntime as ort
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    if not gpu:
        sys.path.insert(0, os.path.dirname(__file__))
        from zoo import build_families
        build_families(a.zoo)
        if a.model == "resnet50":
            a.model = "resnet"
    report: Dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": gpu, "onnxruntime": ort.__version__,
                              "argv": sys.argv[1:]}
    missed: List[str] = []
    if not a.skip_cycles:
        path = os.path.join(a.zoo, f"{a.model}.onnx")
        c = cycles(path, a.model, a.cycles, a.warmup, a.disk_every, gpu)
        report["cycles"] = c
        print(f"{a.cycles} evict/restore cycles of {a.model} in {c['seconds']:.1f} s: device drift "
              f"{c['drift_bytes'] / MiB:.1f} MiB (final {c['final_drift_bytes'] / MiB:.1f} MiB), host RSS drift "
              f"{c['rss_drift_bytes'] / MiB:.1f} MiB, swap-in median {c['swap_in_ms_median']:.2f} ms, swap-out "
              f"{c['swap_out_ms_median']:.2f} ms, wrong {c['wrong']}", flush=True)
        if c["drift_bytes"] > DRIFT_GOAL:
            missed.append(f"drift {c['drift_bytes'] / MiB:.1f} MiB > 64 MiB")
        if c["wrong"]:
            missed.append(f"{c['wrong']} wrong outputs in the cycles")
    if not a.skip_load:
        folder = fitting_zoo(a.zoo, a.oversubscription)
        config = StressConfig(zoo=folder, budget_of_weights=1 / a.oversubscription, requests=a.requests,
                              threads=a.threads, policies=["lru"], baselines=[], simulate=not gpu,
                              link_bytes_per_s=None if gpu else 2e9, session_overhead="0" if gpu else "1MiB",
                              progress=False)
        load = run_stress(config)
        emit(load)
        report["load"] = {"models": sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".onnx")),
                          "oversubscription": a.oversubscription, "report": load}
        c = load["contenders"]["modelcache-lru"]
        if failed(load):
            missed.append(f"load: OOM {c['oom']}, wrong {c['wrong']}, errors {c['errors']}")
    report["missed"] = missed
    print("\ngoals: " + ("all met" if not missed else "missed: " + "; ".join(missed)), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
