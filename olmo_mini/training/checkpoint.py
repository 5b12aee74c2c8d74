"""Verified, atomic step checkpoints of one run, and finding the one to resume from.

``<run_dir>/checkpoints/step_<N>/`` holds what ``Trainer.save_checkpoint`` writes: a
torch.distributed.checkpoint directory under FSDP (``ModelParallelStrategy``: one shard file per
rank plus ``meta.pt``, loadable on any number of processes), else one ``state.ckpt`` file. Besides
model and optimizer it carries Lightning's loop and scheduler state, the DataModule's position and
the module's counters and RNG states (``LanguageModelModule.on_save_checkpoint``), and
``config.yaml``: the resolved config of the run that wrote it (the tools read the architecture
from there, not from a file a later launch can replace).

Atomicity and integrity: everything is written to ``.step_<N>.<run id>.tmp``; rank 0 then
fsyncs every file, records its size and XXH3-128 digest in the ``COMPLETE`` marker (with the step and the
run id), fsyncs the marker and renames the directory. A crash before the rename leaves only a temp
directory of this run, which nothing reads and this run's next save removes. Resuming verifies the
digests; ``resume=auto`` takes the newest checkpoint of this run that verifies and says which
newer ones it skipped and why. Pruning removes only this run's checkpoints and temp directories.
Optimizer and schedule settings changed at resume replace the restored ones from the resumed
step (``ResumedSettings``); docs/checkpoints.md lists what may change and what stops the run.

No checkpoint is saved while the run is in a streak of skipped (non-finite) steps, so the kept
checkpoints are never the diverged ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import MISSING, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only

from olmo_mini.config import ConfigError, ModelConfig, OptimConfig, TrainConfig
from olmo_mini.integrity import ALGORITHM, file_digest
from olmo_mini.run_dir import (
    COMPLETE,
    CONFIG_FILE,
    HISTORY_FILE,
    STATE_FILE,
    complete_checkpoints,
    list_skipped,
    newest_verified,
    read_marker,
    saved_config,
    verify,
)
from olmo_mini.stepping import StepCallback
from olmo_mini.training.optim import reapply

log = logging.getLogger(__name__)

# Model fields that may differ between a checkpoint and the run resuming it: how the same
# weights are computed, or how they were first made, not what they compute.
RESUMABLE_MODEL_FIELDS = ("compile", "norm_backend", "init_from", "init_std")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); its temp dir is removed."""


class StepCheckpoint(StepCallback):
    """Save every ``every_n_steps`` optimizer steps (and at the last step if ``save_final``)."""

    def __init__(
        self,
        directory: Path,
        every_n_steps: int,
        keep_last: int,
        save_final: bool,
        run_id: str,
        config_yaml: str,
    ) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.save_final = save_final
        self.run_id = run_id
        self.config_yaml = config_yaml
        # The newest checkpoint this run saved or resumed from (named when a run diverges).
        self.last_saved: Path | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Rank 0's id names the temp dir every rank writes into (ranks that SLURM or torchrun
        # started together may have read the run record before rank 0 wrote it).
        self.run_id = trainer.strategy.broadcast(self.run_id, src=0)
        if trainer.ckpt_path is not None:
            self.last_saved = checkpoint_dir(trainer.ckpt_path)

    def post_optim_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        final = self.save_final and step >= trainer.max_steps
        if periodic or final:
            self.save(trainer, pl_module, step)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Path | None:
        """Write ``step_<step>`` (collective: every rank calls it); None if the run is in a
        streak of skipped steps, whose weights are not worth keeping."""
        pl_module.flush_metrics()  # the skip counters are exact from here on
        if pl_module.consecutive_skips > 0:
            rank_zero_only(log.warning)(
                "step %d: not saving a checkpoint during a streak of %d skipped steps",
                step,
                pl_module.consecutive_skips,
            )
            return None
        sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        final = self.directory / f"step_{step}"
        tmp = self.directory / f".step_{step}.{self.run_id}.tmp"
        try:
            if trainer.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            trainer.strategy.barrier()
            trainer.save_checkpoint(tmp if sharded else tmp / STATE_FILE, weights_only=False)
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                (tmp / CONFIG_FILE).write_text(self.config_yaml)
                marker = {
                    "step": step,
                    "sharded": sharded,
                    "world_size": trainer.world_size,
                    "run_id": self.run_id,
                    "files": _digest_files(tmp),
                }
                _write_synced(tmp / COMPLETE, json.dumps(marker, indent=1))
                _fsync_dir(tmp)
                if final.exists():  # re-saving a step after resuming from an earlier checkpoint
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.directory)
                log.info("checkpoint saved: %s", final)
                self._prune()
        except OSError as e:
            if trainer.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint step_{step} could not be written to {self.directory}: "
                f"{e.strerror or e}; removed its partial files, the earlier checkpoints are intact"
            ) from None
        trainer.strategy.barrier()
        self.last_saved = final
        return final

    def _prune(self) -> None:
        """Older checkpoints of this run beyond ``keep_last``, and its leftover temp dirs."""
        for old in complete_checkpoints(self.directory, self.run_id)[: -self.keep_last]:
            shutil.rmtree(old)
        for tmp in self.directory.glob(f".step_*.{self.run_id}.tmp"):
            shutil.rmtree(tmp)


def _digest_files(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, xxh3_128}}`` of every file under ``directory``, each fsynced."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            digest = file_digest(f)
            os.fsync(f.fileno())
        rel = path.relative_to(directory).as_posix()
        digests[rel] = {"size": path.stat().st_size, ALGORITHM: digest}
    return digests


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_resume(
    resume: str | None,
    run_dir: Path,
    sharded_strategy: bool,
    run_id: str | None,
    model: ModelConfig,
) -> str | None:
    """The ``ckpt_path`` for ``Trainer.fit``: None for a fresh start.

    ``auto`` takes the newest checkpoint of this run under ``<run_dir>/checkpoints`` that
    verifies, logging each newer one it skips (none at all: a fresh start, logged too). A given
    path must verify. Either way its architecture must match ``model``.
    """
    if resume is None:
        return None
    if resume == "auto":
        directory = run_dir / "checkpoints"
        path, skipped = newest_verified(directory, run_id)
        for damaged, reason in skipped:
            rank_zero_only(log.warning)("resume=auto: skipping %s: %s", damaged, reason)
        if path is None and not skipped:
            rank_zero_only(log.info)("no checkpoint under %s: starting fresh", directory)
            return None
        if path is None:
            raise ConfigError(
                f"resume=auto: no checkpoint under {directory} verifies ({list_skipped(skipped)})"
            )
    else:
        path = Path(resume)
        reason = verify(path)
        if reason is not None:
            raise ConfigError(f"resume: {path} is not a usable checkpoint: {reason}")
    check_architecture(path, model)
    saved_sharded = read_marker(path)["sharded"]
    if saved_sharded != sharded_strategy:
        need = "trainer=fsdp" if saved_sharded else "trainer=default or trainer=ddp"
        raise ConfigError(
            f"resume: {path} was written {'with' if saved_sharded else 'without'} FSDP sharding; "
            f"resume it with {need} (any number of devices)"
        )
    rank_zero_only(log.info)("resuming from %s", path)
    return str(path if saved_sharded else path / STATE_FILE)


def checkpoint_dir(ckpt_path: str) -> Path:
    """The ``step_<N>`` directory of a ``ckpt_path`` from ``resolve_resume``."""
    path = Path(ckpt_path)
    return path.parent if path.name == STATE_FILE else path


def check_architecture(checkpoint: Path, model: ModelConfig) -> None:
    """Stop, naming every field, if ``model`` differs from the architecture in ``checkpoint``."""
    saved = saved_config(checkpoint).model
    diffs = []
    for f in fields(ModelConfig):
        if f.name in RESUMABLE_MODEL_FIELDS:
            continue
        then, now = saved.get(f.name), getattr(model, f.name)
        if then != now:
            diffs.append(f"model.{f.name}: checkpoint {then}, now {now}")
    if diffs:
        raise ConfigError(
            f"resume: {checkpoint} holds another architecture ({'; '.join(diffs)}); resume with the "
            f"checkpoint's values (only {', '.join('model.' + n for n in RESUMABLE_MODEL_FIELDS)} "
            "may change)"
        )


def changed_settings(checkpoint: Path, config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint's value, this launch's)}`` for the optimizer and schedule settings
    (``optim.*``, and ``trainer.max_steps``, which the schedule spans) that a resume from
    ``checkpoint`` changes. They all take effect from the resumed step (``ResumedSettings``);
    what may not change is refused elsewhere: the architecture by ``check_architecture``, the
    data and its order by the data module's fingerprint, the sharding by ``resolve_resume``."""
    saved = saved_config(checkpoint)
    pairs = [
        # A setting newer than the checkpoint had its default there.
        (f"optim.{f.name}", saved.optim.get(f.name, f.default), getattr(config.optim, f.name))
        for f in fields(OptimConfig)
        if f.default is not MISSING
    ]
    pairs.append(("trainer.max_steps", saved.trainer.max_steps, config.trainer.max_steps))
    return {name: (then, now) for name, then, now in pairs if then != now}


class ResumedSettings(L.Callback):
    """On a resumed run: this launch's optimizer and schedule settings replace the restored
    ones (restoring the optimizer and scheduler state puts back the saved run's, so a lowered
    ``optim.lr`` would otherwise be ignored), each changed one is logged on one line, and the
    resume is appended to ``<run_dir>/history.jsonl``."""

    def __init__(self, run_dir: Path, checkpoint: Path, changes: dict[str, tuple[Any, Any]]):
        self.history = Path(run_dir) / HISTORY_FILE
        self.checkpoint = checkpoint
        self.changes = changes

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has restored the optimizer and scheduler state by now.
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        reapply(trainer.optimizers[0], scheduler, pl_module.configured_optim)
        if not trainer.is_global_zero:
            return
        first = trainer.global_step + 1
        for name, (then, now) in self.changes.items():
            log.info("%s %s → %s from step %d", name, then, now, first)
        record = {
            "time": datetime.now(timezone.utc).isoformat(),
            "run_id": read_marker(self.checkpoint).get("run_id"),
            "resumed_from": str(self.checkpoint),
            "from_step": first,
            "changed": {name: list(pair) for name, pair in self.changes.items()},
        }
        with open(self.history, "a") as f:
            f.write(json.dumps(record) + "\n")
