"""Printing and plotting a stress report (the dict ``stress.run_stress`` returns)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from ...sizes import format_bytes


def table(report: Dict[str, Any]) -> List[str]:
    """The terminal table: one row per contender, then Belady's offline optimum."""
    prefix = report["baseline_requests"] < report["requests"]
    head = (f"{'contender':<17} {'requests':>8} {'hit rate':>9} " + (f"{'hit@base':>9} " if prefix else "") +
            f"{'swap-ins':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'swap-in':>8} {'req/s':>8} "
            f"{'peak device':>12} {'/budget':>7} {'waited':>7} {'sessions':>8} {'OOM':>4} {'wrong':>5} {'errors':>6}")
    rows = [head, "-" * len(head)]
    for name, c in report["contenders"].items():
        swap = "-" if c["median_swap_in_ms"] is None else f"{c['median_swap_in_ms']:.1f}"
        rows.append(f"{name:<17} {c['requests']:>8} {c['hit_rate']:>9.1%} " +
                    (f"{c['hit_rate_baseline_prefix']:>9.1%} " if prefix else "") +
                    f"{c['swap_ins']:>8} {c['p50_ms']:>8.2f} {c['p95_ms']:>8.2f} {c['p99_ms']:>8.2f} {swap:>8} "
                    f"{c['throughput_rps']:>8.1f} {format_bytes(c['peak_device_bytes']):>12} "
                    f"{c.get('peak_over_budget') or 0:>7.2f} {c.get('waited_share', 0):>7.1%} "
                    f"{c.get('sessions_created', '-'):>8} {c['oom']:>4} {c['wrong']:>5} {c['errors']:>6}")
    b = report["belady"]
    rows.append(f"{'belady (offline)':<17} {report['requests']:>8} {b['hit_rate']:>9.1%} " +
                (f"{b['hit_rate_baseline_prefix']:>9.1%} " if prefix else ""))
    if prefix:
        rows.append(f"hit@base: hit rate on the first {report['baseline_requests']} requests, the part of the "
                    f"trace the baselines served")
        for name, c in report["contenders"].items():
            if c["requests"] < report["baseline_requests"]:
                rows.append(f"  {name} served only the first {c['requests']} (its hit@base is on those)")
    rows.append("swap-in: median ms per model load onto the device (modelcache: backend swap-in; baselines: "
                "session creation)")
    rows.append(f"/budget: peak device bytes (a reading every 10 ms) over the budget; waited: requests that waited "
                f"for room; sessions: sessions created during the run ({report.get('architectures', '?')} "
                f"architecture(s); lru-count and naive create one per load)")
    for name, c in report["contenders"].items():
        if c.get("accounted_at_peak_bytes") is not None:
            rows.append(f"{name}: at the peak device reading its books held "
                        f"{format_bytes(c['accounted_at_peak_bytes'])} (their own peak "
                        f"{format_bytes(c['peak_accounted_bytes'] or 0)}; both since the start, as the device bytes)")
    for name, c in report["contenders"].items():
        if c["first_error"]:
            rows.append(f"{name}: first failure: {c['first_error']}")
    return rows


def plot(report: Dict[str, Any], path: str) -> None:
    """A PNG: device memory over time with the budget and reserve, tier occupancy over time, and
    the latency CDF of each contender. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, tiers, cdf) = plt.subplots(1, 3, figsize=(18, 5.2))
    unit, label = (float(1 << 30), "GiB") if report["budget_bytes"] >= 2 << 30 else (float(1 << 20), "MiB")
    for name, c in report["contenders"].items():
        t = [row[0] for row in c["timeline"]]
        mem.plot(t, [row[1] / unit for row in c["timeline"]], label=name, linewidth=1.2)
    mem.axhline(report["budget_bytes"] / unit, color="black", linestyle="--", label="budget")
    if report["reserve_bytes"]:
        mem.axhline(report["reserve_bytes"] / unit, color="grey", linestyle=":", label="reserve")
    mem.set(title="device memory held by the cache's process", xlabel="seconds", ylabel=label)
    mem.legend(fontsize=8)
    first = next((n for n in report["contenders"] if n.startswith("modelcache")), None)
    if first is not None:
        timeline = report["contenders"][first]["timeline"]
        t = [row[0] for row in timeline]
        tiers.plot(t, [row[2] for row in timeline], label="on the device")
        tiers.plot(t, [row[3] for row in timeline], label="on the host")
        tiers.set(title=f"tier occupancy ({first})", xlabel="seconds", ylabel="models")
        tiers.legend(fontsize=8)
    for name, c in report["contenders"].items():
        lat = c["latency_cdf_s"]
        if lat:
            cdf.plot([v * 1e3 for v in lat], [(i + 1) / len(lat) for i in range(len(lat))], label=name)
    cdf.set_xscale("log")
    cdf.set(title="request latency CDF", xlabel="ms (log)", ylabel="fraction of requests")
    cdf.legend(fontsize=8)
    fig.suptitle(f"modelcache stress: {report['device']}; {report['requests']} requests, "
                 f"budget {format_bytes(report['budget_bytes'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def emit(report: Dict[str, Any], out: Callable[[str], None] = print) -> None:
    out("")
    for row in table(report):
        out(row)
