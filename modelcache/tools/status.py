"""``modelcache status``: the GPUs as NVML sees them, and caches' entries."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from ..errors import ConfigError, CorruptFileError, MonitorError
from ..sizes import format_bytes


def gpu_table() -> List[str]:
    """One row per GPU (used, free, total, processes), or why there is none."""
    from ..devices.nvml import NvmlMonitor, _nvml, _release
    try:
        pynvml = _nvml()
    except MonitorError as exc:
        return [f"no GPU table: {exc.reason}"]
    try:
        n = pynvml.nvmlDeviceGetCount()
    finally:
        _release()
    rows = [f"{'gpu':<4} {'name':<28} {'used':>10} {'free':>10} {'total':>10}  processes (pid: bytes)"]
    import os
    visible = os.environ.pop("CUDA_VISIBLE_DEVICES", None)   # list every GPU by its NVML index
    try:
        for index in range(n):
            monitor = NvmlMonitor(index)
            try:
                reading = monitor.reading()
                procs = ", ".join(f"{pid}: {format_bytes(b)}" for pid, b in sorted(monitor.processes().items()))
                rows.append(f"{index:<4} {monitor.name[:28]:<28} {format_bytes(reading.used_bytes):>10} "
                            f"{format_bytes(reading.free_bytes):>10} {format_bytes(reading.total_bytes):>10}  "
                            f"{procs or '-'}")
            finally:
                monitor.close()
    finally:
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    return rows


def read_status(path: str) -> Dict[str, Any]:
    """The status JSON ``ModelCache.dump_status(path)`` wrote. Raises :class:`CorruptFileError`
    naming the file when it is not JSON or not an object (``OSError`` when it cannot be read)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        status = json.loads(data)
    except ValueError as exc:       # JSONDecodeError, UnicodeDecodeError
        raise CorruptFileError(f"{path} is not valid JSON ({exc}); expected a file written by "
                               f"ModelCache.dump_status(path)") from None
    if not isinstance(status, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(status).__name__}, not the object "
                               f"ModelCache.dump_status(path) writes")
    return status


def cache_table(status: Dict[str, Any], source: Optional[str] = None) -> List[str]:
    """A cache's entries from ``ModelCache.status()`` (or the JSON ``dump_status`` wrote, read
    from ``source``). Raises :class:`CorruptFileError` when a field is missing or of a wrong type."""
    try:
        return _cache_table(status)
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else f"a field of the wrong type ({exc})"
        where = source if source is not None else "the status"
        raise CorruptFileError(f"{where} is not a status written by ModelCache.dump_status(path): {what}") from None


def _cache_table(status: Dict[str, Any]) -> List[str]:
    stats = status["stats"]
    rows = [f"cache on device {status['device']}, policy {status['policy']}: {stats['models']} models, "
            f"{format_bytes(stats['device.bytes'])} of a {format_bytes(stats['device.budget_bytes'])} budget on the "
            f"device, hit rate {stats['hit_rate']:.1%}",
            f"{'model':<24} {'tier':<9} {'device':>10} {'host':>10} {'hits':>7} {'misses':>7} {'loads':>5} "
            f"{'leases':>6} {'backend':<12} {'mode':<8}"]
    for e in sorted(status["entries"], key=lambda e: e["name"]):
        rows.append(f"{e['name'][:24]:<24} {e['tier']:<9} {format_bytes(e['device_bytes']):>10} "
                    f"{format_bytes(e['host_bytes']):>10} {e['hits']:>7} {e['misses']:>7} {e['loads']:>5} "
                    f"{e['leases']:>6} {str(e['backend']):<12} {str(e.get('mode') or '-'):<8}")
    return rows


def report(caches: Sequence[Any] = ()) -> str:
    """The GPU table and each of ``caches`` (``ModelCache`` objects), as text."""
    lines = gpu_table()
    for cache in caches:
        try:
            lines += [""] + cache_table(cache.status())
        except Exception:   # a closed cache
            continue
    return "\n".join(lines)
