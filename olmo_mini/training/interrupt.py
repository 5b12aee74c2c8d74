"""Preemption and Ctrl-C: save a checkpoint at the next step boundary on every rank, then stop.

SIGTERM (what SLURM sends on preemption and at the time limit), the requeue signal
(``checkpoint.requeue_signal``, SIGUSR1 by default: what ``sbatch --signal=B:USR1@<seconds>``
sends before the limit) and SIGINT (Ctrl-C) only set a flag. At the next optimizer step the ranks
agree on it, all save ``step_<N>`` and raise ``Interrupted``; ``train.py`` then prints how to
resume and exits with 128 + the signal number (a ``&&`` chain or ``afterok`` dependency does not
treat the run as finished). Under SLURM the requeue signal also requeues the job
(``scontrol requeue``, as Lightning's auto-requeue does). A second Ctrl-C stops at once.

Agreeing costs nothing on one process (a Python flag). On several, a signal may reach one rank
only (SIGTERM to Lightning's launcher process) or reach ranks at different steps, so every
optimizer step all-reduces one int on a CPU (gloo) group: no device sync, only a host-side
rendezvous of a few microseconds, which the ranks' gradient all-reduces impose anyway.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only

from olmo_mini.stepping import StepCallback
from olmo_mini.training.checkpoint import StepCheckpoint

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """The run stopped on a signal; ``checkpoint`` is the one saved at ``step`` (None if the
    run was in a streak of skipped steps, or checkpoints are off)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, requeued: bool) -> None:
        self.signum, self.step, self.checkpoint, self.requeued = signum, step, checkpoint, requeued
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"{name} at step {step}: {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal(StepCallback):
    """Installs the handlers when training starts (after Lightning's own, which would exit 0
    without saving) and restores the previous ones when it ends."""

    def __init__(self, checkpoint: StepCheckpoint, requeue_signal: str | None) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.requeue = signal.Signals[requeue_signal] if requeue_signal else None
        self.signals = [signal.SIGTERM, signal.SIGINT, *([self.requeue] if self.requeue else [])]
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._distributed = False
        self._group: dist.ProcessGroup | None = None  # None: the default (gloo) group

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._distributed = dist.is_available() and dist.is_initialized() and trainer.world_size > 1
        if self._distributed and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.received is None:
            self.received = signum
            rank_zero_only(log.warning)(
                "%s received: saving a checkpoint at the next step, then stopping%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
            )

    def post_optim_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        signum = self._agreed()
        if signum is None:
            return
        saved = self.checkpoint.last_saved
        if saved is None or saved.name != f"step_{step}":
            saved = self.checkpoint.save(trainer, pl_module, step)
        requeued = False
        if signum == self.requeue and os.environ.get("SLURM_JOB_ID") and trainer.is_global_zero:
            requeued = _requeue()
        raise Interrupted(signum, step, None if saved is None else str(saved), requeued)

    def _agreed(self) -> int | None:
        """The signal any rank received (the highest number if several), else None."""
        if not self._distributed:
            return self.received
        flag = torch.tensor([self.received or 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item()) or None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


# How long ``scontrol requeue`` may take. It answers in well under a second while slurmctld
# responds (and gives up by itself after its MessageTimeout, 10 s by default); the wait must end
# well within SLURM's KillWait (30 s by default): the time between SIGTERM and SIGKILL at the limit
# or at preemption, which also has to cover the checkpoint's save and the exit.
REQUEUE_TIMEOUT_S = 10.0


def _requeue() -> bool:
    job = os.environ["SLURM_JOB_ID"]
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S
        )
    except FileNotFoundError:
        log.warning("could not requeue SLURM job %s: scontrol not found", job)
        return False
    except subprocess.TimeoutExpired:
        log.warning(
            f"could not requeue SLURM job {job}: scontrol requeue gave no answer in "
            f"{REQUEUE_TIMEOUT_S:g} s (stopped it; requeue by hand with: scontrol requeue {job})"
        )
        return False
    if done.returncode != 0:
        log.warning("could not requeue SLURM job %s: %s", job, done.stderr.strip())
    return done.returncode == 0
