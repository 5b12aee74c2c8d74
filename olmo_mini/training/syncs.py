"""``HostSyncDetector``: records every operation that would make the host wait for the device.

A training step that never waits for the GPU keeps it busy: the host queues the next kernels
while the device runs the last ones. Three kinds of operation break that, and a dispatch mode
(``TorchDispatchMode``, which sees every aten op of the Python thread) catches them by name and
arguments, on any device, without a GPU:

- reading a device value on the host: ``aten._local_scalar_dense`` (``.item()``, ``float()``,
  ``bool()``, ``if tensor:``) and ``aten.equal``;
- ops whose output shape depends on the data (``nonzero``, ``masked_select``, ``unique``,
  boolean-mask indexing ``x[mask]`` / ``x[mask] = v``, ``repeat_interleave`` without
  ``output_size``, ``bincount``): the host needs the size to allocate the output;
- copies between host memory and the device: ``_to_copy`` / ``copy_`` across the boundary
  (a host-to-device copy is asynchronous only with ``non_blocking=True`` from pinned memory),
  and tensors made from Python data (``torch.tensor(x, device=...)``, ``torch.as_tensor``,
  ``torch.from_numpy``: ``aten.lift_fresh``), which on CUDA are a synchronous copy.

On a CPU-only machine the step's "device" is the CPU itself, so nothing crosses a boundary the
detector could see. ``HostSyncDetector(torch.device("cpu"))`` therefore uses a proxy: every
tensor made from Python data counts as a host-to-device copy (it would be one with the model on
a GPU), and reading a tensor into Python (``.tolist()``, ``.numpy()``, seen by a
``TorchFunctionMode`` since they dispatch no aten op on CPU) counts as a device-to-host copy.
The proxy cannot tell a tensor meant to stay on the host from one meant for the device: use it
on code that runs on the device. On CUDA the real boundary is checked and the proxy is off.
"""

from __future__ import annotations

import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_READS = {aten._local_scalar_dense, aten.equal}
_DATA_DEPENDENT_SHAPES = {
    aten.nonzero,
    aten.argwhere,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
    aten.bincount,
}
_MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_FROM_PYTHON_DATA = {aten.lift_fresh, aten.lift_fresh_copy}
_COPIES = {aten._to_copy, aten.copy_}
# Read into Python without an aten op on CPU (the proxy's device-to-host copies).
_PYTHON_READS = {torch.Tensor.tolist, torch.Tensor.numpy}
# Frames skipped when naming where a sync comes from.
_LIBRARIES = (*(str(Path(module.__file__).parent) for module in (torch, lightning)), __file__)


@dataclass(frozen=True)
class HostSync:
    """One operation that makes the host wait: what, why, in which labelled window, and the
    calling line (the innermost frame outside torch, Lightning and this file)."""

    op: str
    reason: str
    label: Any
    caller: traceback.FrameSummary

    def __str__(self) -> str:
        where = f"{self.caller.filename}:{self.caller.lineno} in {self.caller.name}"
        return f"{self.op} ({self.reason}) at {where}"


class HostSyncDetector(TorchDispatchMode):
    """Context manager recording :class:`HostSync` entries in ``records`` while active.

    ``device``: where the step's tensors live (``torch.device("cpu")``: the proxy above).
    ``label`` tags what is recorded: set it as the watched code moves from part to part (a
    step, a flush).
    """

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.proxy = self.device.type == "cpu"
        self.records: list[HostSync] = []
        self.label: Any = None
        self._stack: ExitStack | None = None

    def __enter__(self) -> HostSyncDetector:
        self._stack = ExitStack()
        if self.proxy:
            self._stack.enter_context(_PythonReads(self))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._stack.close()
        self._stack = None

    def record(self, op: str, reason: str) -> None:
        self.records.append(HostSync(op, reason, self.label, _caller()))

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types, args=(), kwargs=None):
        """Run ``func``; record it if it makes the host wait (see the module docstring)."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in _READS:
            self.record(str(func), "reads a device value on the host")
        elif packet in _DATA_DEPENDENT_SHAPES or _repeats_without_size(func, args, kwargs):
            self.record(str(func), "output shape depends on the data")
        elif packet in _MASK_INDEXING and _has_mask_index(args):
            self.record(str(func), "boolean-mask indexing: output shape depends on the data")
        elif packet in _FROM_PYTHON_DATA and _on(out, self.device):
            self.record(str(func), "a tensor made from Python data: a host-to-device copy")
        elif packet in _COPIES and not self.proxy:
            source = args[1] if packet is aten.copy_ else args[0]
            target = args[0].device if packet is aten.copy_ else out.device
            if source.device.type == "cpu" and target.type != "cpu":
                non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
                if not (non_blocking and source.is_pinned()):
                    self.record(str(func), "host-to-device copy (blocking or from pageable memory)")
            elif source.device.type != "cpu" and target.type == "cpu":
                self.record(str(func), "device-to-host copy")
        return out


class _PythonReads(TorchFunctionMode):
    def __init__(self, detector: HostSyncDetector) -> None:
        super().__init__()
        self.detector = detector

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PYTHON_READS:
            self.detector.record(f"Tensor.{func.__name__}", "device-to-host copy (CPU proxy)")
        return func(*args, **(kwargs or {}))


def _on(out: Any, device: torch.device) -> bool:
    return isinstance(out, torch.Tensor) and out.device.type == device.type


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


def _repeats_without_size(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    """``repeat_interleave`` with tensor repeats and no ``output_size``: the total is summed on
    the host (a Python ``int`` of repeats is expanded without one)."""
    if func.overloadpacket is not aten.repeat_interleave:
        return False
    repeats = args[1] if func._overloadname != "Tensor" else args[0]
    return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None


def _caller() -> traceback.FrameSummary:
    stack = traceback.extract_stack()
    return next((f for f in reversed(stack) if not f.filename.startswith(_LIBRARIES)), stack[0])
