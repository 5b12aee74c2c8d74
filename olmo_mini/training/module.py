"""The LightningModule: one micro-batch per ``training_step``, one global batch per optimizer step.

Lightning accumulates ``grad_accum`` micro-batches (``Trainer(accumulate_grad_batches=...)``) and
scales each loss by ``1/grad_accum``. At the end of a global batch ``on_before_optimizer_step``
clips the gradients and checks on the device that loss and grad norm are finite; a bad step is
skipped by fused AdamW's ``found_inf`` (weights, moments and its step count stay untouched), as
``GradScaler`` skips fp16 overflow steps. Nothing waits for the device there: each step's metrics
go to the ``MetricRecorder`` and stay on the device until a flush (a logging step, a checkpoint,
a validation, the end), where one transfer brings all of them over and every step is logged.
Metrics carry ``step`` = the optimizer step they belong to (1-based), the same number as
``checkpoints/step_<N>``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from olmo_mini.config import ConfigError, TrainConfig
from olmo_mini.model import OLMo2
from olmo_mini.stepping import StepBoundary, recount_micro_batches
from olmo_mini.training.optim import build_optimizer, build_scheduler
from olmo_mini.training.parallel import build_model
from olmo_mini.training.recorder import MetricRecorder, Rows


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class LanguageModelModule(L.LightningModule):
    def __init__(self, config: TrainConfig, precision: str) -> None:
        super().__init__()
        self.config = config
        self.precision_name = precision
        self.grad_accum = config.grad_accum_steps
        self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
        self.model: OLMo2 | None = None
        # Where every metric goes: callbacks record through ``pl_module.recorder`` too.
        self.recorder = MetricRecorder()
        # Counters saved in checkpoints.
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._diverged_at: int | None = None
        self._steps = StepBoundary()  # which optimizer step ends, for the flush check
        # Per-global-batch loss sums (device tensors: no sync per micro-batch).
        self._ce_sum: torch.Tensor | None = None
        self._z_sum: torch.Tensor | None = None
        self._val_losses: list[torch.Tensor] = []
        self.val_loss: float | None = None  # the last validation's, once flushed

    def setup(self, stage: str) -> None:
        try:
            self.trainer.datamodule.check_vocab(self.config.model.vocab_size)
        except ValueError as e:
            raise ConfigError(f"model.vocab_size: {e}") from None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        mesh = self.device_mesh["data_parallel"] if self.config.trainer.strategy == "fsdp" else None
        self.model = build_model(
            self.config.model, self.config.seed, self.config.trainer, self.precision_name, mesh
        )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.config.optim)
        scheduler = build_scheduler(optimizer, self.config.optim, self.config.trainer.max_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        out = self.model(
            batch["input_ids"], labels=batch["labels"], z_loss=self.config.optim.z_loss
        )
        if self._ce_sum is None:
            self._ce_sum, self._z_sum = out.ce.detach(), out.z.detach()
        else:
            self._ce_sum = self._ce_sum + out.ce.detach()
            self._z_sum = self._z_sum + out.z.detach()
        # The output-logit statistics reach callbacks as on_train_batch_end's ``outputs``.
        return {"loss": out.loss, "max_logit": out.max_logit, "lse_sum": out.lse_sum}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self._steps.starting(self.trainer)  # the step this update completes
        clip = self.config.optim.grad_clip  # null: no clipping (an infinite norm scales by 1)
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), math.inf if clip is None else clip, foreach=True
        )
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        losses = torch.stack([self._ce_sum, self._z_sum]) / self.grad_accum
        self._ce_sum = self._z_sum = None
        if dist.is_available() and dist.is_initialized():  # mean over ranks, every step: the
            dist.all_reduce(losses)  # skip decision below must be the same on every rank
            losses = losses / dist.get_world_size()
        values = torch.cat([losses, norm.reshape(1).float()])  # [ce, z, grad_norm]
        # Fused AdamW skips the update (weights, moments, step count) where this is nonzero.
        optimizer.found_inf = (~values.isfinite().all()).float()
        for name, value in zip(("ce_loss", "z_loss", "grad_norm"), values, strict=True):
            self.recorder.record(step, f"train/{name}", value)
        self.recorder.record(step, "train/lr", optimizer.param_groups[0]["lr"])
        self.tokens_seen += self.tokens_per_step

    def flush_metrics(self, collective: bool = True) -> Rows:
        """Log everything recorded so far (one host sync): this module's hook first, then the
        callbacks' in their order; stop if too many steps in a row were skipped. Without
        ``collective`` (one rank failing) nothing is combined over ranks."""
        hooks = [self, *(c for c in self.trainer.callbacks if hasattr(c, "pre_log_metrics"))]
        rows = self.recorder.flush(self.loggers, hooks, collective)
        if self._diverged_at is not None:
            max_skips = self.config.optim.max_consecutive_skips
            raise TrainingDiverged(
                f"step {self._diverged_at}: {max_skips} optimizer steps in a row had a non-finite "
                f"loss or gradient norm (optim.max_consecutive_skips={max_skips}); stopping. Their "
                "updates were skipped; lower optim.lr and resume from a checkpoint saved before "
                "the streak."
            )
        return rows

    def pre_log_metrics(self, rows: Rows) -> None:
        """Per flushed training step: ``train/loss``, the skip counters and ``train/tokens``."""
        steps = [step for step, row in rows.items() if "train/ce_loss" in row]
        tokens = self.tokens_seen - self.tokens_per_step * len(steps)
        for step in steps:
            row = rows[step]
            row["train/loss"] = row["train/ce_loss"] + row["train/z_loss"]
            if all(map(math.isfinite, (row["train/loss"], row["train/grad_norm"]))):
                self.consecutive_skips = 0
            else:
                self.skipped_steps += 1
                self.consecutive_skips += 1
                if self.consecutive_skips >= self.config.optim.max_consecutive_skips:
                    self._diverged_at = self._diverged_at or step
            tokens += self.tokens_per_step
            row["train/skipped_steps"] = float(self.skipped_steps)
            row["train/tokens"] = float(tokens)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After a completed step (and after every callback has recorded its metrics of the
        step: Lightning calls the module's hook last), flush on logging steps and the last."""
        step = self._steps.ended()
        if step is not None and (
            step % self.config.trainer.log_every_n_steps == 0 or step >= self.trainer.max_steps
        ):
            self.flush_metrics()
        # Stopping through should_stop makes Lightning validate once more at the last step.
        if self.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val_losses.append(self.model(batch["input_ids"], labels=batch["labels"]).ce)

    def on_validation_epoch_end(self) -> None:
        step = self.global_step
        self.recorder.record(step, "val/loss", torch.stack(self._val_losses).mean(), "mean")
        self._val_losses = []
        self.val_loss = self.flush_metrics()[step]["val/loss"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Saves go through StepCheckpoint.save, which flushes first: these counters and the
        # callbacks' states (the spike windows, taken before this hook) have seen every step.
        checkpoint["counters"] = {
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
        }
        states = [rng_states()]
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, rng_states())
        checkpoint["rng_states"] = states  # one per rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint["counters"]
        self.tokens_seen = counters["tokens_seen"]
        self.skipped_steps = counters["skipped_steps"]
        self.consecutive_skips = counters["consecutive_skips"]
        # The saving run may have had another world size, so another accumulation.
        recount_micro_batches(checkpoint, self.grad_accum)
        states = checkpoint["rng_states"]
        # Same world size: each rank continues its own stream; otherwise all take rank 0's.
        rank = self.global_rank if len(states) == self.trainer.world_size else 0
        set_rng_states(states[rank])


def rng_states() -> dict[str, Any]:
    """Every global RNG's state, in types the weights-only unpickler accepts (no numpy arrays)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
