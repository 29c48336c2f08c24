"""``modelcache demo``: a stress run of a minute or two on generated models, on whatever hardware is
there (a simulated device on machines without a GPU, said so in the output)."""
from __future__ import annotations

import os
from typing import Callable

from .stress import StressConfig, failed, run_stress, save_json
from .stress.report import emit, plot


def demo_config(out_dir: str, simulate: bool = False, requests: int = 6000) -> StressConfig:
    # on a simulated device, copies cross a 2 GB/s link and a session costs 1 MiB, for modelcache and
    # the baselines alike (a GPU scaled down with the models)
    return StressConfig(models=12, min_size="2MiB", max_size="24MiB", layers=4, workload="zipf", zipf_s=1.1,
                        requests=requests, threads=4, budget="40MiB", reserve=0,
                        baseline_requests=max(100, requests // 6), simulate=simulate,
                        link_bytes_per_s=2e9, session_overhead="1MiB",
                        models_dir=os.path.join(out_dir, "models"), progress=True)


def run_demo(out_dir: str = "modelcache-demo", simulate: bool = False, requests: int = 6000,
             out: Callable[[str], None] = print) -> int:
    """Run the demo; writes ``results.json`` and ``plot.png`` under ``out_dir``. Returns the exit
    code: 1 if any request failed, gave a wrong output or ran out of memory."""
    os.makedirs(out_dir, exist_ok=True)
    report = run_stress(demo_config(out_dir, simulate, requests), log=out)
    emit(report, out)
    json_path = os.path.join(out_dir, "results.json")
    save_json(report, json_path)
    out(f"\nJSON: {json_path}")
    try:
        png = os.path.join(out_dir, "plot.png")
        plot(report, png)
        out(f"plot: {png}")
    except ImportError:
        out("plot: skipped (matplotlib is not installed: pip install 'modelcache[plot]')")
    return 1 if failed(report) else 0
