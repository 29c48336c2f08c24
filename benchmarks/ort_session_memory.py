"""Device memory that ONNX Runtime sessions keep in weights mode, with and without a shared arena
and per-run arena shrinkage (``shared_arena``, ``shrink_arena`` options). GPU only.

    python benchmarks/ort_session_memory.py --models-dir DIR --count 8 --shared-arena 1 --shrink-arena 1

Registers ``--count`` generated models (``modelcache stress`` models in ``--models-dir``, made if
missing), runs each once on the device, then evicts them all, printing this process's NVML
memory at each step, the measured session bytes and the median run time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import modelcache as mc  # noqa: E402
from modelcache.tools.stress import generate_models  # noqa: E402

GiB = 1 << 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", default="/tmp/models")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--shared-arena", type=int, default=1)
    p.add_argument("--shrink-arena", type=int, default=1)
    a = p.parse_args()
    specs = generate_models(a.models_dir, a.count, 64 << 20, 1 << 30, 4, 0)   # the stress run's first models
    cache = mc.ModelCache(device=0, device_budget="60GiB", reserve=0, watch_interval=None)
    mon = cache.monitor
    base = mon.process_bytes()
    for s in specs:
        cache.register(s.name, s.path, mode="weights", verify=False, host_session=False,
                       shared_arena=bool(a.shared_arena), shrink_arena=bool(a.shrink_arena))
        cache.prefetch(s.name, tier=mc.Tier.HOST).result()
    runs = []
    for s in specs:
        with cache.use(s.name) as m:
            for _ in range(3):
                t = time.perf_counter()
                m.run(None, s.feed)
                runs.append(time.perf_counter() - t)
    on = mon.process_bytes() - base
    weights = sum(s.nbytes for s in specs)
    for s in specs:
        cache.evict(s.name)
    parked = mon.process_bytes() - base
    sessions = [cache.info(s.name).details["session_device_bytes"] for s in specs]
    print(f"shared_arena={a.shared_arena} shrink_arena={a.shrink_arena}: {len(specs)} models, weights "
          f"{weights / GiB:.2f} GiB; process growth with all on device {on / GiB:.2f} GiB; after evicting all "
          f"{parked / GiB:.2f} GiB; measured session bytes median {statistics.median(sessions) / 2**20:.0f} MiB; "
          f"run median {statistics.median(runs) * 1e3:.2f} ms; accounted parked "
          f"{cache.stats()['device.parked_bytes'] / GiB:.2f} GiB", flush=True)
    cache.close()


if __name__ == "__main__":
    main()
