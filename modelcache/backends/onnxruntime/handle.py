"""One ONNX model's state (:class:`OrtHandle`) and the interface of a swap mode (:class:`Mode`).

A model runs in one of two modes, chosen at load (``weights_mode.py``, ``session_mode.py``); the
handle keeps the mode's object and asks it for everything that differs between them, so the
backend never tests which mode a model is in.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

from ...devices.host import HostBlock
from ...tiers import Tier
from ..base import Handle
from .graph import ValueInfo, Weight

if TYPE_CHECKING:  # pragma: no cover
    from .backend import OnnxRuntimeBackend
    from .model import OrtModel
    from .weights_mode import SessionGroup


class OrtHandle(Handle):
    """Fields shared by both modes; each mode documents the ones it uses."""

    def __init__(self, name: str) -> None:
        super().__init__(name, Tier.HOST)
        self.ops: "Mode" = None  # type: ignore[assignment]   # the swap mode, set at load
        self.mode_reason = ""
        self.options: Dict[str, Any] = {}
        self.graph = b""                       # serialized graph (weights mode: weights as inputs)
        self.weights: List[Weight] = []
        self.weights_nbytes = 0                # bytes of the block in use: up to the end of the last weight
        self.block: Optional[HostBlock] = None          # the weights in host memory
        self.input_names: List[str] = []
        self.output_names: List[str] = []
        self.signature: Optional[Tuple[List[ValueInfo], List[ValueInfo]]] = None  # original inputs, outputs
        self.sample_inputs: Optional[List[Tuple[str, Any, List[int]]]] = None   # for a warm-up run
        self.sample_feed: Optional[Dict[str, Any]] = None   # the input the check ran (warm-ups use it too)
        self.check: Dict[str, Any] = {}         # the first swap-in's check: deviation, tolerance...
        self.wrapper: Optional["OrtModel"] = None       # what use() hands out while on the device
        self.host_session: Any = None           # a CPU session serving while on the host
        self.host_wrapper: Optional["OrtModel"] = None
        self.serve_on_host = False
        self.files: Dict[str, Tuple[str, str]] = {}    # disk tier: kind -> (path, sha256)
        # weights mode
        self.prepared = False                   # optimized for the device and checked (the first swap-in)
        self.device_weights: Any = None         # devices.Buffer holding the weights on the device
        self.group: Optional["SessionGroup"] = None     # the shared session it uses
        self.group_key = ""
        # session mode
        self.session: Any = None                # the device session
        self.charge: Any = None                 # devices.Charge for the device session's bytes
        self.runner: Any = None                 # the session's runner (devices.Runner)
        self.host_dir: Optional[str] = None     # model.onnx + weights file
        self.host_in_ram = True                 # host_dir is on tmpfs (counts as host memory)
        self.optimized = False                  # graph saved optimized; load with opts off
        self.optimized_for = ""                 # the device type it was optimized for ("cuda", "cpu")
        self.session_device_bytes = 0           # device memory the session itself took (measured)

    @property
    def mode(self) -> str:
        return self.ops.name

    def model_path(self) -> str:
        assert self.host_dir is not None
        return os.path.join(self.host_dir, "model.onnx")

    # accounting: what differs between modes is the mode's answer -------------------------------
    @property
    def device_bytes(self) -> int:
        return self._device_bytes + (self.ops.shared_bytes(self) if self.tier is Tier.DEVICE else 0)

    @device_bytes.setter
    def device_bytes(self, value: int) -> None:
        self._device_bytes = value

    def estimated_device_bytes(self) -> int:
        return self.ops.estimated_device_bytes(self)

    def firm_device_bytes(self) -> int:
        # its weights; the session and working memory are estimates until measured
        return self.weights_nbytes or self.estimated_device_bytes()

    def estimated_host_bytes(self) -> int:
        return self.ops.estimated_host_bytes(self)

    def parked_device_bytes(self) -> int:
        return self.ops.shared_bytes(self) if self.tier is Tier.HOST else 0

    def kept_after_eviction(self) -> int:
        return self.ops.kept_bytes(self)

    def shared_device(self) -> Optional[Tuple[Any, int]]:
        group = self.group
        return (group.key, group.kept_bytes()) if group is not None and group.session is not None else None

    def shared_seconds(self) -> float:
        group = self.group
        return group.create_seconds if group is not None else 0.0

    def shared_key(self) -> Optional[Any]:
        return self.group_key or None

    def details(self) -> Dict[str, Any]:
        return {"mode": self.mode, "mode_reason": self.mode_reason, "weights": len(self.weights),
                "weights_bytes": self.weights_nbytes, **self.check, **self.ops.details(self),
                "pinned": bool(self.block is not None and self.block.pinned),
                "serves_on_host": self.host_session is not None, "optimized_graph": self.optimized}


class Mode:
    """How a model moves between host and device. One instance per mode and backend; methods
    may run in several threads at once for different handles."""

    name = "mode"

    def __init__(self, backend: "OnnxRuntimeBackend") -> None:
        self.backend = backend

    # load and moves ------------------------------------------------------------------------
    def prepare(self, handle: OrtHandle) -> None:
        """After load: arrange the host tier (the handle's graph and block are set)."""

    def to_device(self, handle: OrtHandle) -> None:
        raise NotImplementedError

    def to_host(self, handle: OrtHandle) -> None:
        """Free what the device tier holds (the wrapper is retired already)."""
        raise NotImplementedError

    def unpark(self, handle: OrtHandle) -> None:
        """Free device bytes kept while parked on the host."""

    def disk_payload(self, handle: OrtHandle) -> Tuple[bytes, Optional[Iterable[Any]]]:
        """The graph's bytes and the weights' chunks (or None) for the disk tier."""
        raise NotImplementedError

    def leave_host(self, handle: OrtHandle) -> None:
        """The model went to disk or is released: drop the host tier's state."""

    def from_disk(self, handle: OrtHandle) -> None:
        """Back from disk (graph and block restored): arrange the host tier again."""
        self.prepare(handle)

    def host_session(self, handle: OrtHandle) -> Any:
        """A CPU session serving from host memory."""
        raise NotImplementedError

    def host_model(self, handle: OrtHandle) -> "OrtModel":
        """The model object that serves through ``handle.host_session``."""
        raise NotImplementedError

    def release(self, handle: OrtHandle) -> None:
        """Free everything the mode holds for the handle (must not raise)."""

    # accounting ----------------------------------------------------------------------------
    def shared_bytes(self, handle: OrtHandle) -> int:
        """Device bytes shared with other models that this handle carries in the accounting."""
        return 0

    def kept_bytes(self, handle: OrtHandle) -> int:
        """Of those, what stays on the device when the model leaves it."""
        return 0

    def estimated_device_bytes(self, handle: OrtHandle) -> int:
        raise NotImplementedError

    def estimated_host_bytes(self, handle: OrtHandle) -> int:
        raise NotImplementedError

    def details(self, handle: OrtHandle) -> Dict[str, Any]:
        return {}
