"""Optimizer steps in Lightning's micro-batch hooks: the one place that says where a step ends.

With gradient accumulation Lightning calls ``on_train_batch_end`` once per micro-batch and
``on_before_optimizer_step`` once per optimizer step, after the last micro-batch's backward: the
step whose update starts there ends at the next ``on_train_batch_end``. ``StepCallback`` gives
callbacks OLMo-core's two hooks on top of that: ``pre_optim_step`` and ``post_optim_step`` (its
``post_train_batch``).

It imports nothing of ours, so both ``training`` and the stability monitor (below training) use it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class StepBoundary:
    """Which optimizer step is ending: ``starting`` in ``on_before_optimizer_step``, ``ended``
    in ``on_train_batch_end`` (None after a micro-batch that only accumulated gradients)."""

    def __init__(self) -> None:
        self._step: int | None = None

    def starting(self, trainer: L.Trainer) -> int:
        """The 1-based number of the step whose update is about to run."""
        self._step = trainer.global_step + 1
        return self._step

    def ended(self) -> int | None:
        """The step that ended with this micro-batch, once; else None."""
        step, self._step = self._step, None
        return step


class StepCallback(L.Callback):
    """A callback with optimizer-step hooks; subclasses that override ``on_train_batch_end``
    (for per-micro-batch work) call it through ``super()``, and ``__init__`` likewise."""

    def __init__(self) -> None:
        self._boundary = StepBoundary()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._boundary.starting(trainer)
        self.pre_optim_step(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        step = self._boundary.ended()
        if step is not None:
            self.post_optim_step(trainer, pl_module, step)

    def pre_optim_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """The step's gradients are complete (before clipping); its update is about to run."""

    def post_optim_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Step ``step`` (1-based, ``== trainer.global_step``) and its last micro-batch are done."""


def recount_micro_batches(checkpoint: dict[str, Any], micro_batches_per_step: int) -> None:
    """Set a checkpoint's micro-batch counters to ``global_step × micro_batches_per_step``.

    Lightning resumes gradient accumulation (and its validation cadence) from the micro-batches
    it counted, and their number per step depends on the world size of the run that saved.
    Recounting them for this run keeps them aligned with optimizer steps. Saves happen at step
    boundaries, inside the last micro-batch's ``on_train_batch_end``: every micro-batch is
    counted as processed and all but that one as completed, as Lightning's own state is there.
    This writes Lightning's private loop-progress state (``tests/test_stepping.py`` fails if the
    installed Lightning stores it elsewhere or resumes differently).
    """
    micro = checkpoint["global_step"] * micro_batches_per_step
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    for counts in (progress["total"], progress["current"]):
        counts.update(ready=micro, started=micro, processed=micro, completed=micro - 1)
