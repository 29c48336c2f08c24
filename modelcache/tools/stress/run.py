"""``modelcache stress``: one request trace served by modelcache (each policy) and by what a user
would otherwise do, side by side, with every response checked.

Contenders:
- ``modelcache-<policy>``: a :class:`ModelCache` with the ONNX Runtime backend in weights mode;
  every model is registered and parked on the host first (untimed), as a service would at start.
- ``lru-count``: LRU by model count, as Ray Serve's ``max_num_models_per_replica`` does, with the
  count a user must pick to be safe (``budget // largest model``) and stock sessions created from
  the model file on every miss.
- ``naive``: the seed's recipe: load the requested model on a miss and unload the rest.
- ``belady``: the offline optimum hit rate of the trace (furthest-in-future by bytes), computed.

A request is a hit, for every contender, when its model was on the device when it arrived: a
request that waits for a load in flight (someone else's) is a miss. (Belady replays the trace
one request at a time, so it never waits: its figure is an upper bound.)

On a machine without a GPU the device is simulated: the baselines' sessions run on the CPU and
allocate their weights' bytes on a :class:`SimulatedDevice` of ``device_total`` bytes, so peak
memory and out-of-memory failures are measured the same way for everyone.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

import numpy as np

from ...devices import DeviceMonitor, NvmlMonitor, SimulatedDevice
from ...errors import ConfigError, DeviceOutOfMemoryError, ModelCacheError
from ...sizes import Size, format_bytes, parse_size
from .contenders import Contender, LruCountContender, ModelCacheContender, NaiveContender
from .models import ModelSpec, family_specs, generate_models, output_ok, specs_from_files, zoo_specs
from .sizing import resolve_sizes
from .workload import belady_hits, make_trace, read_trace


@dataclass
class StressConfig:
    """A stress run. ``models``, ``min_size``, ``max_size`` and ``budget`` may be None: sized for the
    machine (``sizing.resolve_sizes``: the documented GPU run, or scaled down when simulated)."""
    models: Optional[int] = 12
    min_size: Optional[Size] = "4MiB"
    max_size: Optional[Size] = "48MiB"
    layers: int = 4
    model_files: Sequence[str] = ()
    families: int = 0               #: this many generated models of several architectures (CPU builders)
    zoo: Optional[str] = None       #: a folder of models exported by benchmarks/zoo.py
    budget_of_weights: Optional[float] = None   #: the budget as a fraction of all models' weights
    prepare: bool = True            #: modelcache: each model's first swap-in happens before the run
    workload: str = "zipf"          #: "zipf", "uniform", or a trace file path
    zipf_s: float = 1.1
    requests: int = 2000
    threads: int = 4
    budget: Optional[Size] = "64MiB"
    reserve: Size = 0
    policies: Sequence[str] = ("lru", "lfu", "cost")
    baselines: Sequence[str] = ("lru-count", "naive")
    baseline_requests: Optional[int] = None   #: serve only a prefix of the trace for the baselines
    naive_requests: Optional[int] = None      #: a shorter prefix for naive (default: baseline_requests)
    simulate: bool = False
    device_total: Optional[Size] = None       #: simulated device size (default 4 x budget)
    max_swap_ins: Optional[int] = None        #: modelcache's limit on swap-ins in flight (None: none)
    link_bytes_per_s: Optional[float] = None  #: simulated device: host->device bandwidth (None: free copies)
    session_overhead: Size = 0                #: simulated device: bytes a session costs besides weights
    run_overhead: Size = 0                    #: simulated device: bytes a run takes while it runs
    arena_keeps: Optional[float] = None       #: simulated device: runs' memory kept in an arena (SimulatedDevice)
    provider_options: Dict[str, str] = field(default_factory=dict)  #: ONNX Runtime's CUDA provider, every contender
    models_dir: Optional[str] = None
    seed: int = 0
    progress: bool = True


@dataclass
class Result:
    name: str
    requests: int = 0
    seconds: float = 0.0
    hits: int = 0
    swap_ins: int = 0
    oom: int = 0
    wrong: int = 0
    errors: int = 0
    first_error: Optional[str] = None
    peak_device_bytes: int = 0
    budget_bytes: int = 0
    samples: int = 0                 #: device readings taken (every 10 ms)
    samples_over_budget: int = 0     #: readings above the budget
    waited: int = 0                  #: requests that waited for room
    accounted_at_peak: Optional[int] = None   #: the contender's books at the peak device reading
    peak_accounted_bytes: Optional[int] = None   #: the books' own peak (over the same samples)
    median_swap_in_s: Optional[float] = None
    latencies: List[float] = field(default_factory=list)
    hit_flags: List[bool] = field(default_factory=list)
    timeline: List[List[float]] = field(default_factory=list)   # [t, device bytes, on device, on host]
    extra: Dict[str, Any] = field(default_factory=dict)          # the contender's own figures

    def summary(self) -> Dict[str, Any]:
        lat = np.array(self.latencies) if self.latencies else np.array([float("nan")])
        out = {
            "requests": self.requests, "seconds": round(self.seconds, 3),
            "throughput_rps": self.requests / self.seconds if self.seconds else 0.0,
            "hit_rate": self.hits / self.requests if self.requests else 0.0, "swap_ins": self.swap_ins,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p95_ms": float(np.percentile(lat, 95) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "peak_device_bytes": self.peak_device_bytes,
            "peak_over_budget": self.peak_device_bytes / self.budget_bytes if self.budget_bytes else None,
            "samples": self.samples, "samples_over_budget": self.samples_over_budget,
            "waited_share": self.waited / self.requests if self.requests else 0.0,
            "accounted_at_peak_bytes": self.accounted_at_peak, "peak_accounted_bytes": self.peak_accounted_bytes,
            "oom": self.oom, "wrong": self.wrong, "errors": self.errors, "first_error": self.first_error,
            "median_swap_in_ms": None if self.median_swap_in_s is None else self.median_swap_in_s * 1e3,
        }
        flags = np.array(self.hit_flags[:len(self.latencies)], dtype=bool)
        if len(flags) == len(self.latencies) and len(flags):
            for label, mask in (("hit", flags), ("miss", ~flags)):
                if mask.any():
                    out[f"{label}_p50_ms"] = float(np.percentile(lat[mask], 50) * 1e3)
                    out[f"{label}_p99_ms"] = float(np.percentile(lat[mask], 99) * 1e3)
        out.update(self.extra)
        return out


# ----------------------------------------------------------------------------- running
def run_contender(contender: Contender, trace: Sequence[str], specs: Dict[str, ModelSpec], threads: int,
                  progress: Optional[Callable[[str, int, int], None]] = None, budget: int = 0) -> Result:
    result = Result(contender.name, budget_bytes=budget)
    n = len(trace)
    latencies = np.full(n, np.nan)
    hits = np.zeros(n, dtype=bool)
    waited = np.zeros(n, dtype=bool)
    counter = iter(range(n))
    counter_lock = threading.Lock()
    done = [0]
    lock = threading.Lock()
    stop = threading.Event()
    start = time.perf_counter()

    def sampler() -> None:
        """Device bytes every 10 ms (peak and readings over the budget); tiers every 50 ms."""
        tick = 0
        on_device = on_host = 0
        while not stop.wait(0.01):
            try:
                books = contender.accounted_bytes()
                dev = contender.device_bytes()
                if tick % 5 == 0:
                    on_device, on_host = contender.tiers()
            except Exception:
                continue
            tick += 1
            result.samples += 1
            result.samples_over_budget += bool(budget and dev > budget)
            if dev > result.peak_device_bytes or result.samples == 1:
                result.accounted_at_peak = books
            result.peak_device_bytes = max(result.peak_device_bytes, dev)
            if books is not None:
                result.peak_accounted_bytes = max(result.peak_accounted_bytes or 0, books)
            if tick % 5 == 0:
                result.timeline.append([time.perf_counter() - start, dev, on_device, on_host])
            if progress and tick % 5 == 0:
                progress(contender.name, done[0], n)

    def worker() -> None:
        while True:
            with counter_lock:
                i = next(counter, None)
            if i is None:
                return
            spec = specs[trace[i]]
            t0 = time.perf_counter()
            try:
                out, hit, waited[i] = contender.serve(spec)
                latencies[i] = time.perf_counter() - t0
                hits[i] = hit
                if not output_ok(out, spec.reference):
                    with lock:
                        result.wrong += 1
            except Exception as exc:
                latencies[i] = time.perf_counter() - t0
                oom = isinstance(exc, (DeviceOutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower() \
                    or "failed to allocate" in str(exc).lower()
                with lock:
                    if oom:
                        result.oom += 1
                    else:
                        result.errors += 1
                    if result.first_error is None:
                        result.first_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            with lock:
                done[0] += 1

    if progress:
        progress(contender.name, 0, n)
    sample_thread = threading.Thread(target=sampler, daemon=True)
    sample_thread.start()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    result.seconds = time.perf_counter() - start
    stop.set()
    sample_thread.join()
    try:
        dev = contender.device_bytes()
        result.peak_device_bytes = max(result.peak_device_bytes, dev)
        result.timeline.append([result.seconds, dev, *contender.tiers()])
    except Exception:
        pass
    if progress:
        progress(contender.name, n, n)
    result.requests = n
    result.hits = int(hits.sum())
    result.waited = int(waited.sum())
    result.hit_flags = hits.tolist()
    result.latencies = [float(v) for v in latencies if not np.isnan(v)]
    result.swap_ins = contender.swap_ins()
    result.median_swap_in_s = contender.median_swap_in()
    result.extra = contender.extra()
    return result


class Progress:
    """Progress bars on stderr (tqdm: done/total, rate and ETA), one per task name; shown only on a
    terminal unless ``force``. Call it as ``progress(name, done, total)``; a bar closes at total."""

    def __init__(self, enabled: bool, *, force: bool = False, file: Optional[TextIO] = None) -> None:
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled and (force or self.file.isatty())
        self._bars: Dict[str, Any] = {}
        self._lock = threading.Lock()
        self._tqdm: Any = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:     # a dependency of modelcache's tools; without it, no bars
                self.enabled = False
            else:
                self._tqdm = tqdm

    def __call__(self, name: str, done: int, total: int, unit: str = "req") -> None:
        if not self.enabled:
            return
        with self._lock:
            bar = self._bars.get(name)
            if bar is None:
                bar = self._bars[name] = self._tqdm(total=total, desc=name, unit=unit, file=self.file,
                                                    mininterval=0.2, dynamic_ncols=True, leave=True)
            if done > bar.n:
                bar.update(done - bar.n)
            if done >= total:
                bar.close()
                del self._bars[name]

    def unit(self, unit: str) -> Callable[[str, int, int], None]:
        """This progress with another unit (e.g. ``"model"``)."""
        return lambda name, done, total: self(name, done, total, unit)

    def close(self) -> None:
        """Close the bars still open (work that ended early)."""
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()


def run_stress(config: StressConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every contender on one trace; returns the report (see ``report.py`` for printing).
    Progress bars (models generated, requests served) go to stderr."""
    progress = Progress(config.progress)
    try:
        return _run_stress(config, log, progress)
    finally:
        progress.close()


def _run_stress(config: StressConfig, log: Callable[[str], None], progress: Progress) -> Dict[str, Any]:
    reserve = parse_size(config.reserve, what="reserve")
    gpu_monitor: Optional[NvmlMonitor] = None
    if not config.simulate:
        try:
            gpu_monitor = NvmlMonitor()
        except ModelCacheError:
            gpu_monitor = None
    folder = config.models_dir or os.path.join(os.path.expanduser("~/.cache/modelcache"), "stress-models")
    config, sizing = resolve_sizes(config, gpu_monitor is not None, folder)
    if sizing:
        log(sizing)
    if config.provider_options and gpu_monitor is None:
        log(f"provider options {config.provider_options} unused: the CPU provider runs on a simulated device")
    start = time.perf_counter()
    gpu_providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu_monitor is not None else None
    if config.zoo:
        specs = zoo_specs(config.zoo, gpu_providers)
    elif config.families:
        specs = family_specs(folder, config.families, config.seed, progress=progress.unit("model"))
    elif config.model_files:
        specs = specs_from_files(config.model_files, providers=gpu_providers)
    else:
        assert config.models is not None       # resolve_sizes chose it
        specs = generate_models(folder, config.models, parse_size(config.min_size, what="min_size"),
                                parse_size(config.max_size, what="max_size"), config.layers, config.seed,
                                progress=progress.unit("model"))
    gen_s = time.perf_counter() - start
    weights = sum(s.nbytes for s in specs)
    budget = int(weights * config.budget_of_weights) if config.budget_of_weights else \
        parse_size(config.budget, what="budget")
    by_name = {s.name: s for s in specs}
    names = [s.name for s in specs]
    if os.path.exists(config.workload):
        trace = read_trace(config.workload, names)
        workload = f"trace {config.workload}"
    else:
        trace = make_trace(names, config.requests, config.workload, config.zipf_s, config.seed)
        workload = f"{config.workload}" + (f" s={config.zipf_s}" if config.workload == "zipf" else "")
    largest = max(s.nbytes for s in specs)
    if largest > budget:
        raise ConfigError(f"the largest model ({format_bytes(largest)}) does not fit the budget ({format_bytes(budget)})")
    count = max(1, budget // largest)
    device_total = parse_size(config.device_total, what="device_total") if config.device_total else 4 * budget
    where = (f"GPU {gpu_monitor.device}: {gpu_monitor.name} (NVML)" if gpu_monitor is not None
             else f"simulated device of {format_bytes(device_total)}" +
             (" (requested)" if config.simulate else " (no NVIDIA GPU found)"))
    log(f"modelcache stress on {where}")
    architectures = len({s.architecture for s in specs})
    log(f"{len(specs)} models of {architectures} architecture(s), {format_bytes(min(s.nbytes for s in specs))}.."
        f"{format_bytes(largest)} ({format_bytes(weights)} in all; ready in {gen_s:.1f} s); budget "
        f"{format_bytes(budget)}, reserve {format_bytes(reserve)}; {len(trace)} requests ({workload}) from "
        f"{config.threads} threads; lru-count keeps {count} models (budget // largest)")
    results: Dict[str, Result] = {}

    def monitor() -> DeviceMonitor:
        gc.collect()        # the last contender's sessions go now, before this one's baseline is read
        if gpu_monitor is not None:
            return gpu_monitor
        return SimulatedDevice(device_total, name="simulated GPU", session_overhead=config.session_overhead,
                               run_overhead=config.run_overhead, arena_keeps=config.arena_keeps,
                               link_bytes_per_s=config.link_bytes_per_s)

    def finished(res: Result) -> None:
        s = res.summary()
        log(f"  {res.name}: {s['requests']} requests in {s['seconds']:.1f} s, hit rate {s['hit_rate']:.1%}, "
            f"p99 {s['p99_ms']:.1f} ms (misses: p50 {s.get('miss_p50_ms', float('nan')):.1f}, "
            f"p99 {s.get('miss_p99_ms', float('nan')):.1f}), median swap-in "
            f"{s['median_swap_in_ms'] if s['median_swap_in_ms'] is not None else float('nan'):.1f} ms, "
            f"OOM {s['oom']}, wrong {s['wrong']}, errors {s['errors']}")
        if res.extra:
            log("    " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.extra.items()))
        if s["first_error"]:
            log(f"    first error: {s['first_error']}")

    for policy in config.policies:
        setup = time.perf_counter()
        contender: Contender = ModelCacheContender(policy, specs, monitor(), budget, reserve, config.max_swap_ins,
                                        config.prepare, progress=progress.unit("model"),
                                        provider_options=config.provider_options)
        log(f"  {contender.name}: {len(specs)} models parked on the host"
            f"{' and prepared on the device' if config.prepare else ''} in {time.perf_counter() - setup:.1f} s")
        try:
            results[contender.name] = run_contender(contender, trace, by_name, config.threads, progress, budget)
            finished(results[contender.name])
        finally:
            contender.close()
            del contender       # its sessions go before the next contender reads its baseline
    base_trace = trace[:config.baseline_requests] if config.baseline_requests else trace
    for baseline in config.baselines:
        if baseline == "lru-count":
            contender = LruCountContender(count, monitor(), config.provider_options)
        elif baseline == "naive":
            contender = NaiveContender(monitor(), config.provider_options)
        else:
            raise ConfigError(f"baseline {baseline!r} is unknown; use lru-count or naive")
        served = trace[:config.naive_requests] if baseline == "naive" and config.naive_requests else base_trace
        try:
            results[contender.name] = run_contender(contender, served, by_name, config.threads, progress, budget)
            finished(results[contender.name])
        finally:
            contender.close()
            del contender
    sizes = {s.name: s.nbytes for s in specs}
    report: Dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": where, "simulated": gpu_monitor is None,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
        "models": [{"name": s.name, "bytes": s.nbytes, "architecture": s.architecture} for s in specs],
        "architectures": architectures, "budget_bytes": budget,
        "reserve_bytes": reserve, "lru_count": count, "requests": len(trace),
        "baseline_requests": len(base_trace),
        "belady": {"hit_rate": belady_hits(trace, sizes, budget) / len(trace),
                   "hit_rate_baseline_prefix": belady_hits(base_trace, sizes, budget) / max(len(base_trace), 1)},
        "contenders": {},
    }
    for name, res in results.items():
        entry = res.summary()
        flags = res.hit_flags
        entry["hit_rate_baseline_prefix"] = float(np.mean(flags[:len(base_trace)])) if flags else 0.0
        step = max(1, -(-len(res.timeline) // 600))       # a summary: at most 600 points
        entry["timeline"] = res.timeline[::step]
        lat = sorted(res.latencies)
        step = max(1, len(lat) // 1000)
        entry["latency_cdf_s"] = lat[::step]
        report["contenders"][name] = entry
    if gpu_monitor is not None:
        gpu_monitor.close()
    return report


def failed(report: Dict[str, Any]) -> bool:
    """True if any contender had an OOM, a wrong output or a failed request."""
    return any(c["oom"] or c["wrong"] or c["errors"] for c in report["contenders"].values())


def save_json(report: Dict[str, Any], path: str) -> None:
    from ..._fileio import atomic_write
    atomic_write(path, json.dumps(report, indent=1).encode())
