"""``modelcache demo``: generated models, a skewed workload from several threads, and what the
cache did. On a machine without a GPU (or with ``--simulate``) the device is simulated."""
from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, List, Tuple

import numpy as np

from .cache import ModelCache
from .errors import MonitorError
from .monitors import DeviceMonitor, NvmlMonitor, SimulatedDevice
from .sizes import format_bytes
from .tiers import Tier

MiB = 2**20


def _pick_device(simulate: bool, total_model_bytes: int) -> Tuple[DeviceMonitor, str, Callable[[int, int], Any]]:
    """The device to run on and a model factory: torch tensors on a real GPU, arrays otherwise."""
    if not simulate:
        try:
            monitor: DeviceMonitor = NvmlMonitor()
            import torch
            if torch.cuda.is_available():
                def make_tensor(seed: int, nbytes: int) -> Any:
                    return torch.full((nbytes // 4,), float(seed), dtype=torch.float32)
                return monitor, f"GPU {monitor.device}: {monitor.name} (NVML)", make_tensor
            monitor.close()
        except (MonitorError, ImportError):
            pass
    device = SimulatedDevice(max(4 * total_model_bytes, 1024 * MiB), name="simulated GPU")
    why = "requested" if simulate else "no NVIDIA GPU with NVML and torch found"
    return device, f"{device.name} of {format_bytes(device.total_bytes())} ({why})", _make_array


def _make_array(seed: int, nbytes: int) -> np.ndarray:
    return np.full(nbytes // 4, seed, dtype=np.float32)


def run_demo(models: int = 12, requests: int = 2000, threads: int = 4, policy: str = "lru",
             simulate: bool = False, seed: int = 0, out: Callable[[str], None] = print) -> int:
    """Run the demo; returns a process exit code (non-zero if any request failed or was wrong)."""
    rng = random.Random(seed)
    sizes = [int(rng.uniform(8, 48)) * MiB for _ in range(models)]
    monitor, where, make_model = _pick_device(simulate, sum(sizes))
    budget = max(sum(sorted(sizes)[: max(1, models // 3)]), max(sizes))  # room for about a third
    out(f"modelcache demo on {where}")
    out(f"{models} models of {format_bytes(min(sizes))}..{format_bytes(max(sizes))} "
        f"({format_bytes(sum(sizes))} in all), device budget {format_bytes(budget)}, policy {policy}, "
        f"{threads} threads, {requests} requests (Zipf-like)")
    cache = ModelCache(monitor=monitor, device_budget=budget, reserve=0, policy=policy, watch_interval=0.1)
    for i, nbytes in enumerate(sizes):
        cache.register(f"model-{i:02d}", (lambda i=i, n=nbytes: make_model(i, n)))
    weights = [1 / (i + 1) ** 1.1 for i in range(models)]
    names = [f"model-{i:02d}" for i in range(models)]
    failures: List[str] = []
    per_thread = [requests // threads + (1 if t < requests % threads else 0) for t in range(threads)]

    def client(t: int) -> None:
        r = random.Random(seed * 1000 + t)
        for _ in range(per_thread[t]):
            name = r.choices(names, weights)[0]
            try:
                with cache.use(name, timeout=60) as model:
                    if float(model[0]) != float(int(name[-2:])):
                        failures.append(f"{name}: wrong weights")
            except Exception as exc:  # reported, never hidden
                failures.append(f"{name}: {exc}")

    start = time.perf_counter()
    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    stats = cache.stats()
    out("")
    out(f"{'model':<10} {'size':>10} {'tier':>8} {'hits':>6} {'misses':>6} {'loads':>5}")
    for info in sorted(cache.entries(), key=lambda e: e.name):
        size = sizes[int(info.name[-2:])]
        out(f"{info.name:<10} {format_bytes(size):>10} {str(info.tier):>8} {info.hits:>6} {info.misses:>6} "
            f"{info.loads:>5}")
    out("")
    out(f"requests {requests} in {elapsed:.2f} s ({requests / elapsed:,.0f}/s); hit rate "
        f"{stats['hit_rate']:.1%}; loads {stats['loads']}; evictions {stats['evictions']}; "
        f"swap-in p50 {stats.get('swap_in.seconds.p50', 0) * 1e3:.2f} ms")
    out(f"device: {format_bytes(stats['device.bytes'])} held of a {format_bytes(budget)} budget; "
        f"{stats['models.' + str(Tier.DEVICE)]} models on the device, {stats['models.' + str(Tier.HOST)]} on the host")
    cache.close()
    if failures:
        out(f"{len(failures)} request(s) failed, first: {failures[0]}")
        return 1
    return 0
