"""Where the cache's Python around one run goes, piece by piece: a held model's ``run()`` against
its bind-and-run, the input check, the hop into the session (``_on_runner``: caller thread or
runner), the device's context, the gate, the working-memory count, on a model whose run is short
(4 x MatMul 512x512). On the 2-core development machine ``run()`` is 6 us above its
bind-and-run; on the H200 host the zoo put it 70-210 us above (docs/gpu-results-h200-2026-12-04.md):
this names the piece. Best of 5 repeats of ``--number`` calls each, microseconds.

    python benchmarks/run_pieces.py [--gpu] [--number 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import timeit


sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import run_overhead  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--number", type=int, default=20000)
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        cache, feed = run_overhead.tiny_cache(folder, a.gpu)
        with cache.use("m") as held:
            held.run(None, feed)
            outs = [o.name for o in held.get_outputs()]
            noop = lambda *args: None  # noqa: E731
            gate = held._gate

            def context() -> None:
                if held._context is not None:
                    with held._context():
                        pass
            pieces = {
                "run()": lambda: held.run(None, feed),
                "bind_and_run": lambda: held._bind_and_run(outs, feed, None),
                "input check": lambda: held._checked(feed),
                "_on_runner(no-op)": lambda: held._on_runner(noop, outs, feed, None),
                "gate read": lambda: (gate.acquire_read(), gate.release_read()),
                "device context": context,
                "caller member?": lambda: held._callers.member() if held._callers else None,
            }
            if held._working is not None:
                memory, nbytes, key = held._working
                pieces["working count"] = lambda: (memory.begin_working(nbytes, key), memory.end_working(key))
            for label, fn in pieces.items():
                best = min(timeit.repeat(fn, number=a.number, repeat=5)) / a.number * 1e6
                figures[label] = round(best, 2)
                print(f"{label:<22} {best:8.2f} us", flush=True)
            on_caller = held._callers is not None and held._callers.member()
        print(f"runs on the caller's thread: {on_caller}; run() - bind_and_run: "
              f"{figures['run()'] - figures['bind_and_run']:.1f} us")
        figures["on_caller_thread"] = on_caller
        cache.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
