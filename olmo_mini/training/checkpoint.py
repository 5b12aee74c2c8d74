"""Atomic step checkpoints and finding the one to resume from.

``<run_dir>/checkpoints/step_<N>/`` holds what ``Trainer.save_checkpoint`` writes: a
torch.distributed.checkpoint directory under FSDP (``ModelParallelStrategy``: one shard file per
rank plus ``meta.pt``, loadable on any number of processes), else one ``state.ckpt`` file. Besides
model and optimizer it carries Lightning's loop and scheduler state, the DataModule's position and
the module's counters and RNG states (``LanguageModelModule.on_save_checkpoint``).

Atomicity: everything is written to ``.step_<N>.tmp``, then rank 0 adds the ``COMPLETE`` marker
and renames the directory. A crash before the rename leaves only a temp directory, which
``latest_checkpoint`` ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy

from olmo_mini.config import ConfigError

COMPLETE = "COMPLETE"
STATE_FILE = "state.ckpt"
_STEP_DIR = re.compile(r"step_(\d+)")


class StepCheckpoint(L.Callback):
    """Save every ``every_n_steps`` optimizer steps (and at the last step if ``save_final``)."""

    def __init__(self, directory: Path, every_n_steps: int, keep_last: int, save_final: bool) -> None:
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.save_final = save_final
        self._seen_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step  # after a resume: do not re-save the loaded step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # mid-accumulation: no optimizer step in this batch
            return
        self._seen_step = step
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        final = self.save_final and step >= trainer.max_steps
        if periodic or final:
            self.save(trainer, step)

    def save(self, trainer: L.Trainer, step: int) -> Path:
        sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        final = self.directory / f"step_{step}"
        tmp = self.directory / f".step_{step}.tmp"
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier()
        trainer.save_checkpoint(tmp if sharded else tmp / STATE_FILE, weights_only=False)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            marker = {"step": step, "sharded": sharded, "world_size": trainer.world_size}
            (tmp / COMPLETE).write_text(json.dumps(marker))
            if final.exists():  # re-saving a step after resuming from an earlier checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        trainer.strategy.barrier()
        return final

    def _prune(self) -> None:
        for old in complete_checkpoints(self.directory)[: -self.keep_last]:
            shutil.rmtree(old)
        for tmp in self.directory.glob(".step_*.tmp"):
            shutil.rmtree(tmp)


def complete_checkpoints(directory: Path) -> list[Path]:
    """``step_<N>`` directories with the ``COMPLETE`` marker, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), path)
        for path in directory.iterdir()
        if (m := _STEP_DIR.fullmatch(path.name)) and (path / COMPLETE).is_file()
    ]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str | None, run_dir: Path, sharded_strategy: bool) -> str | None:
    """The ``ckpt_path`` for ``Trainer.fit``: None for a fresh start.

    ``auto`` takes the newest complete checkpoint under ``<run_dir>/checkpoints`` (none: fresh).
    """
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise ConfigError(
                f"resume: {path} is not a complete checkpoint (a step_<N> directory holding a "
                f"{COMPLETE} marker)"
            )
    saved_sharded = json.loads((path / COMPLETE).read_text())["sharded"]
    if saved_sharded != sharded_strategy:
        need = "trainer=fsdp" if saved_sharded else "trainer=default or trainer=ddp"
        raise ConfigError(
            f"resume: {path} was written {'with' if saved_sharded else 'without'} FSDP sharding; "
            f"resume it with {need} (any number of devices)"
        )
    return str(path if saved_sharded else path / STATE_FILE)
