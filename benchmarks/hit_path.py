"""Cost of a cache hit: ``with cache.use(name)`` and ``async with cache.ause(name)`` on a resident
model, next to a plain dict lookup (``with nullcontext(models[name])``) measured in the same run.

    python benchmarks/hit_path.py [--models 20] [--rounds 200] [--batch 1000] [--threads 1]

Prints the median time per hit in microseconds over ``rounds`` batches of ``batch`` hits, and
the ratio to the baseline. Goal: <= 20 us per hit on a 2-core machine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import modelcache as mc  # noqa: E402


def per_hit_us(fn, rounds: int, batch: int) -> list:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(batch)
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="threads hitting the cache at once")
    parser.add_argument("--policy", default="lru")
    args = parser.parse_args()

    models = {f"m{i}": np.zeros(1024, np.uint8) for i in range(args.models)}
    cache = mc.ModelCache(monitor=mc.SimulatedDevice("1GiB"), reserve=0, policy=args.policy, watch_interval=None)
    for name, value in models.items():
        cache.register(name, value)
        cache.prefetch(name).result()
    names = list(models)

    def cached(n: int) -> None:
        for i in range(n):
            with cache.use(names[i % len(names)]) as model:
                model.nbytes

    def baseline(n: int) -> None:
        for i in range(n):
            with contextlib.nullcontext(models[names[i % len(names)]]) as model:
                model.nbytes

    async def ahits(n: int) -> None:
        for i in range(n):
            async with cache.ause(names[i % len(names)]) as model:
                model.nbytes

    async def abaseline_hits(n: int) -> None:
        for i in range(n):
            async with contextlib.nullcontext(models[names[i % len(names)]]) as model:   # type: ignore[attr-defined]
                model.nbytes

    def on_loop(coro_fn):
        loop = asyncio.new_event_loop()
        return lambda n: loop.run_until_complete(coro_fn(n))

    def run(fn):
        if args.threads == 1:
            return per_hit_us(fn, args.rounds, args.batch)
        out = []
        def worker():
            out.extend(per_hit_us(fn, args.rounds // args.threads or 1, args.batch))
        ts = [threading.Thread(target=worker) for _ in range(args.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return out

    cached(10_000), baseline(10_000)  # warm up
    base = run(baseline)
    hit = run(cached)
    abase = per_hit_us(on_loop(abaseline_hits), args.rounds, args.batch)
    ahit = per_hit_us(on_loop(ahits), args.rounds, args.batch)
    stats = cache.stats()
    assert stats["misses"] == 0 and stats["hits"] >= args.rounds * args.batch
    cache.close()
    b, h = statistics.median(base), statistics.median(hit)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, policy {args.policy}, {args.threads} thread(s), {args.models} models")
    print(f"dict lookup + nullcontext : median {b:7.3f} us per hit (p95 {sorted(base)[int(.95 * len(base))]:.3f})")
    print(f"cache.use() hit           : median {h:7.3f} us per hit (p95 {sorted(hit)[int(.95 * len(hit))]:.3f})")
    print(f"ratio cache/dict          : {h / b:7.1f} x;  goal <= 20 us per hit: {'met' if h <= 20 else 'NOT met'}")
    ab, ah = statistics.median(abase), statistics.median(ahit)
    print(f"async nullcontext         : median {ab:7.3f} us per hit")
    print(f"cache.ause() hit          : median {ah:7.3f} us per hit (p95 {sorted(ahit)[int(.95 * len(ahit))]:.3f}); "
          f"goal <= 20 us: {'met' if ah <= 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
