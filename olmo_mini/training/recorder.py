"""``MetricRecorder``: the one path from training to the loggers.

Whoever measures (the module, callbacks) calls ``record(step, name, value, reduce)``; tensor
values stay on the device. ``flush`` runs on logging steps, checkpoints, validation ends, the
end of training and exceptions: it combines the values over ranks (``_reduce_over_ranks``),
brings all of them to the host in one transfer (a ``tolist``: the flush's one host sync), hands
the rows to the callbacks' ``pre_log_metrics(rows)`` hooks (which read them and add their own,
as OLMo-core's trainer does) and logs each step's metrics in one call. Between flushes nothing
waits for the device (``tests/training/test_train.py`` checks both with ``training/syncs.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Literal, Protocol

import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger

# How ranks combine a value; ``None``: the value is already the same on every rank.
Reduce = Literal["mean", "sum", "max"]
Rows = dict[int, dict[str, float]]


class MetricsHook(Protocol):
    def pre_log_metrics(self, rows: Rows) -> None:
        """Read and add to the flushed rows (``step -> {name: value}``, in step order)."""


class MetricRecorder:
    def __init__(self) -> None:
        self._pending: dict[int, dict[str, tuple[torch.Tensor | float, Reduce | None]]] = {}

    def record(
        self, step: int, name: str, value: torch.Tensor | float, reduce: Reduce | None = None
    ) -> None:
        """Hold ``value`` (a scalar) as ``name`` at ``step`` until the next flush."""
        if isinstance(value, torch.Tensor):
            value = value.detach().float().reshape(())
        self._pending.setdefault(step, {})[name] = (value, reduce)

    def flush(
        self, loggers: Sequence[Logger], hooks: Iterable[MetricsHook], collective: bool = True
    ) -> Rows:
        """Reduce, transfer, hook and log everything pending; returns the rows logged.

        Every rank must flush at the same points with the same names. Without ``collective``
        (one rank failing alone) values that need other ranks are left out, with a warning.
        """
        pending, self._pending = self._pending, {}
        entries = [
            (step, name, *pending[step][name])
            for step in sorted(pending)
            for name in sorted(pending[step])
        ]  # the same order on every rank
        if not collective and _world_size() > 1:
            dropped = [name for _, name, _, reduce in entries if reduce is not None]
            if dropped:
                warnings.warn(
                    f"not logged (their other ranks' values are out of reach): {dropped}",
                    stacklevel=2,
                )
            entries = [entry for entry in entries if entry[3] is None]
        on_device = [i for i, entry in enumerate(entries) if isinstance(entry[2], torch.Tensor)]
        on_device.sort(key=lambda i: entries[i][3] or "")  # each reduction one contiguous run
        values = [value for _, _, value, _ in entries]
        if on_device:
            stacked = torch.stack([values[i] for i in on_device])
            if _world_size() > 1:
                stacked = _reduce_over_ranks(stacked, [entries[i][3] for i in on_device])
            for i, value in zip(on_device, stacked.tolist(), strict=True):
                values[i] = value
        rows: Rows = {}
        for (step, name, _, _), value in zip(entries, values, strict=True):
            rows.setdefault(step, {})[name] = float(value)
        if not rows:
            return rows
        for hook in hooks:
            hook.pre_log_metrics(rows)
        for logger in loggers:
            for step, metrics in rows.items():
                logger.log_metrics(metrics, step=step)
            logger.save()  # CSVLogger would otherwise write only every 100 rows
        return rows


def log_config(loggers: Sequence[Logger], config: object) -> None:
    """The run's config (a dataclass tree) as every logger's hyperparameters."""
    for logger in loggers:
        logger.log_hyperparams(asdict(config))


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _reduce_over_ranks(values: torch.Tensor, reduces: list[Reduce | None]) -> torch.Tensor:
    """``values`` combined over the default process group, each by its reduction. ``reduces``
    is grouped (each kind one contiguous run), so that every all-reduce works in place on a
    slice: no index tensor is copied from host memory to the device."""
    for reduce, op in (
        ("sum", dist.ReduceOp.SUM),
        ("mean", dist.ReduceOp.SUM),
        ("max", dist.ReduceOp.MAX),
    ):
        run = [i for i, r in enumerate(reduces) if r == reduce]
        if run:
            part = values[run[0] : run[-1] + 1]  # a view of ``values``
            dist.all_reduce(part, op=op)
            if reduce == "mean":
                part /= dist.get_world_size()
    return values
