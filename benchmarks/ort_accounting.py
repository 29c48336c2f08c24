"""Accounted device bytes against NVML's per-process growth, model by model (ONNX Runtime,
weights mode, the stress harness's generated models): where does device memory go that the
cache does not count? Needs a GPU and onnxruntime-gpu.

    python benchmarks/ort_accounting.py --models-dir /dev/shm/modelcache-stress
"""
from __future__ import annotations

import argparse
import gc
import random
import threading

import modelcache as mc
from modelcache.sizes import parse_size
from modelcache.tools.stress import generate_models

MiB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default="/tmp/modelcache-stress")
    parser.add_argument("--models", type=int, default=40)
    parser.add_argument("--min-size", default="64MiB")
    parser.add_argument("--max-size", default="1GiB")
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    specs = generate_models(args.models_dir, args.models, parse_size(args.min_size), parse_size(args.max_size))
    threshold = min(MiB, min(s.nbytes for s in specs) // 8)

    def cache_for(budget: str) -> mc.ModelCache:
        cache = mc.ModelCache(device_budget=budget, reserve="1GiB", watch_interval=None)
        for s in specs:
            cache.register(s.name, s.path, mode="weights", verify=False, host_session=False,
                           weights_threshold=max(threshold, 1024))
        for fut in [cache.prefetch(s.name, tier=mc.Tier.HOST, timeout=None) for s in specs]:
            fut.result()
        return cache

    def unaccounted(cache: mc.ModelCache, base: int):
        """(NVML growth, accounted bytes): accounted read before and after NVML, the larger kept,
        so that moves finishing between the readings do not show up as unaccounted memory."""
        before = cache.stats()["device.accounted_bytes"]
        grown = cache.monitor.process_bytes() - base
        return grown, max(before, cache.stats()["device.accounted_bytes"])

    def report(cache: mc.ModelCache, base: int, label: str) -> None:
        grown, accounted = unaccounted(cache, base)
        print(f"{label:<44} NVML growth {grown / MiB:9.1f} MiB  accounted {accounted / MiB:9.1f}"
              f" MiB  unaccounted {(grown - accounted) / MiB:8.1f} MiB", flush=True)

    # 1. one model at a time, everything fits: growth per model and per new shape
    cache = cache_for("60GiB")
    gc.collect()
    base = cache.monitor.process_bytes()
    for rnd in range(2):
        for i, s in enumerate(specs):
            with cache.use(s.name, timeout=None) as model:
                model.run(None, s.feed)
            if rnd == 0 and (i < 4 or i % 10 == 9):
                report(cache, base, f"pass {rnd}: {i + 1} models on the device")
        report(cache, base, f"pass {rnd}: all {len(specs)} on the device")
        for s in specs:
            cache.evict(s.name)
        report(cache, base, f"pass {rnd}: all evicted")
    cache.close()
    gc.collect()

    # 2. concurrent swap-ins under an 8 GiB budget, then everything evicted
    cache = cache_for("8GiB")
    gc.collect()
    base = cache.monitor.process_bytes()
    order = [s for s in specs for _ in range(3)]
    random.Random(0).shuffle(order)
    it = iter(order)
    lock = threading.Lock()
    peak = [0]

    def work() -> None:
        while True:
            with lock:
                s = next(it, None)
            if s is None:
                return
            with cache.use(s.name, timeout=None) as model:
                model.run(None, s.feed)
                grown, accounted = unaccounted(cache, base)
                with lock:
                    peak[0] = max(peak[0], grown - accounted)

    threads = [threading.Thread(target=work) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"concurrent: largest unaccounted seen {peak[0] / MiB:.1f} MiB", flush=True)
    report(cache, base, f"concurrent ({args.threads} threads): after the run")
    for s in specs:
        cache.evict(s.name)
    report(cache, base, "concurrent: all evicted")
    cache.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
