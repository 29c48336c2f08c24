"""Default sizes of a stress run for the machine it runs on.

On a GPU the defaults are the documented run: 40 generated models of 64 MiB..1 GiB (about 15 GiB
of files) and an 8 GiB budget. A simulated run (``--simulate``, or no GPU found) keeps its model
files within ``min(2 GiB, 10% of the free disk where they are written, 10% of the RAM)``: the same
40 models (fewer only where even 1 MiB models would not fit), scaled down together with the
budget. Sizes the user gives always win.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from ...errors import ConfigError
from ...sizes import format_bytes, parse_size

if TYPE_CHECKING:
    from .run import StressConfig

MiB = 1 << 20
GPU_MODELS = 40
GPU_MIN_SIZE = "64MiB"
GPU_MAX_SIZE = "1GiB"
GPU_BUDGET = "8GiB"
SIM_CAP = 2 << 30               #: a simulated run's model files take at most this many bytes...
SIM_SHARE = 0.10                #: ...and at most this share of the free disk and of the RAM
SIZE_RATIO = 16                 #: max_size / min_size of the GPU defaults (1 GiB / 64 MiB)
BUDGET_RATIO = 8                #: budget / max_size of the GPU defaults (8 GiB / 1 GiB)
SMALLEST_MAX = MiB              #: below this largest-model size, fewer models rather than smaller ones
FILE_OVERHEAD = 4096            #: bytes of a generated model's .onnx and .ref.npz besides 8 B per unit


def hidden_width(target_bytes: float, layers: int) -> int:
    """The width ``generate_models`` gives a model of ``target_bytes`` weights."""
    return max(16, int(round(math.sqrt(target_bytes / 4 / layers) / 16)) * 16)


def model_file_bytes(max_bytes: int, layers: int) -> int:
    """An upper bound on the disk bytes of one generated model of at most ``max_bytes`` weights
    (its ``.onnx``, ``.onnx.data`` and ``.ref.npz``)."""
    hidden = hidden_width(max(max_bytes, 4096) * (1 + 1e-9), layers)
    return layers * hidden * hidden * 4 + 8 * hidden + FILE_OVERHEAD


def _largest_within(per_model: int, layers: int) -> int:
    """The largest ``max_bytes`` whose worst-case model files fit ``per_model`` bytes."""
    size = per_model
    while size > 4096 and model_file_bytes(size, layers) > per_model:
        size = int(size * 0.98)
    return size


def _round_down(size: int) -> int:
    """Whole MiB from 4 MiB up, whole KiB below: sizes that read well in the log."""
    unit = MiB if size >= 4 * MiB else 1024
    return max(unit, size // unit * unit) if size >= unit else size


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor (what ``disk_usage`` can measure)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def machine_cap(folder: str, disk_free: Optional[int] = None,
                ram_total: Optional[int] = None) -> Tuple[int, str]:
    """The bytes a simulated run's model files may take under ``folder``, and why (for the log)."""
    where = _existing(folder)
    if disk_free is None:
        disk_free = shutil.disk_usage(where).free
    if ram_total is None:
        import psutil
        ram_total = psutil.virtual_memory().total
    cap = int(min(SIM_CAP, SIM_SHARE * disk_free, SIM_SHARE * ram_total))
    why = (f"min({format_bytes(SIM_CAP)}, {SIM_SHARE:.0%} of {format_bytes(disk_free)} free at {where}, "
           f"{SIM_SHARE:.0%} of {format_bytes(ram_total)} RAM)")
    return cap, why


def simulated_sizes(models: Optional[int], min_size: Optional[int], max_size: Optional[int],
                    budget: Optional[int], layers: int, cap: int) -> Tuple[int, int, int, int]:
    """(models, min_bytes, max_bytes, budget_bytes) whose generated files fit ``cap`` bytes; the
    arguments that are not None are kept as given."""
    if models is None:
        models = GPU_MODELS
        smallest = model_file_bytes(SMALLEST_MAX, layers) if max_size is None else model_file_bytes(max_size, layers)
        if cap < GPU_MODELS * smallest:
            models = cap // smallest
            if models < 2:
                raise ConfigError(f"a simulated stress run needs at least 2 x {format_bytes(smallest)} for its model "
                                  f"files but may use only {format_bytes(cap)}; pass --models-dir on a disk with room, "
                                  f"or --models, --min-size and --max-size")
    if max_size is None:
        max_size = _round_down(_largest_within(cap // max(models, 1), layers))
        if min_size is not None:
            max_size = max(max_size, min_size)
    if min_size is None:
        min_size = min(max_size, _round_down(max(4096, max_size // SIZE_RATIO)))
    if budget is None:
        budget = BUDGET_RATIO * max_size
    return models, min_size, max_size, budget


def resolve_sizes(config: "StressConfig", gpu: bool, folder: str, disk_free: Optional[int] = None,
                  ram_total: Optional[int] = None) -> Tuple["StressConfig", Optional[str]]:
    """``config`` with its unset sizes (None: ``models``, ``min_size``, ``max_size``, ``budget``)
    chosen for this machine, and a line saying what was chosen and why (None if nothing was)."""
    unset = [k for k in ("models", "min_size", "max_size", "budget") if getattr(config, k) is None]
    if not unset:
        return config, None
    generated = not (config.zoo or config.families or config.model_files)
    if gpu or not generated:
        gpu_defaults: Dict[str, Any] = {"models": GPU_MODELS, "min_size": GPU_MIN_SIZE, "max_size": GPU_MAX_SIZE,
                        "budget": GPU_BUDGET}
        return replace(config, **{k: gpu_defaults[k] for k in unset}), None

    def given(key: str) -> Optional[int]:
        value = getattr(config, key)
        return None if value is None else parse_size(value, what=key)

    cap, why = machine_cap(folder, disk_free, ram_total)
    models, lo, hi, budget = simulated_sizes(config.models, given("min_size"), given("max_size"), given("budget"),
                                             config.layers, cap)
    chosen: Dict[str, Any] = {"models": models, "min_size": lo, "max_size": hi, "budget": budget}
    resolved = replace(config, **{k: chosen[k] for k in unset})
    flags = "/".join("--" + k.replace("_", "-") for k in unset)
    note = (f"sized for this machine (simulated): {models} models of {format_bytes(lo)}..{format_bytes(hi)}, budget "
            f"{format_bytes(budget)}: model files within {format_bytes(cap)} = {why}; pass {flags} to choose")
    return resolved, note
