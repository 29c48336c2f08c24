"""Checking and resolving ``ModelCache``'s arguments: every bad value is a :class:`ConfigError` at
the call that received it, naming the value and what is allowed."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

from ._fileio import private_space
from .devices import DeviceMonitor, HostMonitor, NvmlMonitor
from .errors import ConfigError, MonitorError
from .policies import Policy, make_policy
from .sizes import Size, parse_size


#: each cache's folder inside disk_dir: cache-<pid>-<random> (those of ended processes are reclaimed)
DISK_PREFIX = "cache-"


@dataclass
class Settings:
    """``ModelCache``'s arguments, checked; sizes in bytes, times in seconds."""

    policy: Policy
    monitor: DeviceMonitor
    owns_monitor: bool
    device_budget_bytes: int
    reserve_bytes: int
    host_budget_bytes: int
    disk_dir: Optional[str]
    disk_space: Optional[str]          #: this cache's own folder inside disk_dir
    watch_interval: Optional[float]
    prefetch_workers: int
    max_swap_ins: Optional[int]


def resolve(device: Optional[int], device_budget: Optional[Size], reserve: Size, host_budget: Optional[Size],
            disk_dir: Union[None, str, "os.PathLike[str]"], policy: Union[str, Policy],
            monitor: Optional[DeviceMonitor], watch_interval: Optional[float], prefetch_workers: int,
            max_swap_ins: Optional[int]) -> Settings:
    """Check ``ModelCache``'s arguments and resolve defaults (opening NVML when no monitor is given)."""
    chosen = make_policy(policy)
    if max_swap_ins is not None and not _is_int(max_swap_ins, 1):
        raise ConfigError(f"max_swap_ins={max_swap_ins!r}; use an int >= 1, or None for no limit")
    if not _is_int(prefetch_workers, 1):
        raise ConfigError(f"prefetch_workers={prefetch_workers!r}; use an int >= 1")
    if device is not None and not _is_int(device, 0):
        raise ConfigError(f"device={device!r}; use a CUDA ordinal (an int >= 0), or None for the current device")
    if watch_interval is not None and (not _is_number(watch_interval) or watch_interval < 0):
        raise ConfigError(f"watch_interval={watch_interval!r}; use a number of seconds > 0, or 0 or None to turn "
                          f"the background watcher off")
    if watch_interval is not None and 0 < watch_interval < 0.001:
        raise ConfigError(f"watch_interval={watch_interval!r} s would keep a core busy; use at least 0.001 s")
    if disk_dir is not None and not isinstance(disk_dir, (str, os.PathLike)):
        raise ConfigError(f"disk_dir={disk_dir!r}; use a folder path, or None for no disk tier")
    if monitor is not None and not isinstance(monitor, DeviceMonitor):
        raise ConfigError(f"monitor={monitor!r}; use a DeviceMonitor (e.g. NvmlMonitor, SimulatedDevice) or None")
    owns_monitor = monitor is None
    if monitor is None:
        try:
            monitor = NvmlMonitor(device)
        except MonitorError as exc:
            raise MonitorError(f"{exc.reason}. On a machine without an NVIDIA GPU, pass "
                               f"monitor=modelcache.SimulatedDevice(total='16GiB')") from exc
    elif device is not None and device != monitor.device:
        raise ConfigError(f"device={device} but the monitor watches device {monitor.device}")
    monitor.memory      # the device's memory operations, set up before runtimes start (cuda.CudaMemory)
    try:
        total = monitor.total_bytes()
        reserve_bytes = parse_size(reserve, total=total, what="reserve")
        if reserve_bytes >= total:
            raise ConfigError(f"reserve={reserve!r} ({reserve_bytes} B) must be below the device's total of {total} B")
        if device_budget is None:
            budget = total - reserve_bytes
        else:
            budget = parse_size(device_budget, total=total, what="device_budget")
            if not 0 < budget <= total:
                raise ConfigError(f"device_budget={device_budget!r} ({budget} B) must be in 1..{total} B "
                                  f"(the device's total)")
        host = HostMonitor()
        if host_budget is None:
            host_budget_bytes = host.available_bytes() // 2
        else:
            host_budget_bytes = parse_size(host_budget, total=host.total_bytes(), what="host_budget")
        folder = os.fspath(disk_dir) if disk_dir is not None else None
        space = None
        if folder is not None:
            try:
                space = private_space(folder, DISK_PREFIX)
            except OSError as exc:
                raise ConfigError(f"disk_dir={folder!r} cannot be used: {exc}") from exc
    except BaseException:
        if owns_monitor:
            monitor.close()
        raise
    return Settings(chosen, monitor, owns_monitor, budget, reserve_bytes, host_budget_bytes, folder, space,
                    watch_interval, prefetch_workers, max_swap_ins)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_timeout(timeout: Optional[float], model: Optional[str] = None) -> Optional[float]:
    """``timeout`` in seconds: a number >= 0, or None (wait as long as it takes)."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout != timeout or timeout < 0:
        raise ConfigError(f"timeout={timeout!r}; use a number of seconds >= 0, or None to wait as long as it takes",
                          model=model)
    return None if timeout == math.inf else float(timeout)
