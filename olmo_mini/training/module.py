"""The LightningModule: one micro-batch per ``training_step``, one global batch per optimizer step.

Lightning accumulates ``grad_accum`` micro-batches (``Trainer(accumulate_grad_batches=...)``) and
scales each loss by ``1/grad_accum``. At the end of a global batch ``on_before_optimizer_step``
clips the gradients and checks on the device that loss and grad norm are finite; a bad step is
skipped by fused AdamW's ``found_inf`` (weights, moments and its step count stay untouched), as
``GradScaler`` skips fp16 overflow steps. Nothing waits for the device there: each step's metrics
stay on it until a logging step (every ``trainer.log_every_n_steps``, a checkpoint, the end),
where one transfer brings all of them over and every step is logged. Metrics carry ``step`` =
the optimizer step they belong to (1-based), the same number as ``checkpoints/step_<N>``.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from olmo_mini.config import ConfigError, TrainConfig
from olmo_mini.model import OLMo2
from olmo_mini.model.generation import generate
from olmo_mini.stability.metrics import Reduction, logit_statistics
from olmo_mini.training.optim import build_optimizer, build_scheduler
from olmo_mini.training.parallel import build_model


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class LanguageModelModule(L.LightningModule):
    def __init__(
        self, config: TrainConfig, precision: str, flops_per_token: float, peak_flops: float | None
    ) -> None:
        super().__init__()
        self.config = config
        self.precision_name = precision
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.grad_accum = config.grad_accum_steps
        self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
        self.model: OLMo2 | None = None
        # Counters saved in checkpoints.
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        # Per-global-batch loss sums (device tensors: no sync per micro-batch).
        self._ce_sum: torch.Tensor | None = None
        self._z_sum: torch.Tensor | None = None
        self._window_start = 0.0  # the time of the previous flush
        self._val_started = 0.0
        self.sample_text: str | None = None
        # Steps whose metrics are still on the device: (step, lr, [ce, z, grad_norm]).
        self._pending: list[tuple[int, float, torch.Tensor]] = []
        # For callbacks. ``flush_listeners`` are called with each flushed step's metrics (floats),
        # in step order, as soon as they reach the host. ``last_step_finite``: a device bool,
        # whether the last update was applied. ``logit_stats``: on measuring steps, a Reduction
        # the stability monitor places here to receive output-logit statistics.
        self.flush_listeners: list[Callable[[dict[str, float]], None]] = []
        self.last_step_finite: torch.Tensor | None = None
        self.logit_stats: Reduction | None = None

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
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(batch["input_ids"], labels=batch["labels"], z_loss=self.config.optim.z_loss)
        if self.logit_stats is not None:
            logit_statistics(self.logit_stats, out.max_logit, out.lse_sum, batch["labels"].numel())
        if self._ce_sum is None:
            self._ce_sum, self._z_sum = out.ce.detach(), out.z.detach()
        else:
            self._ce_sum = self._ce_sum + out.ce.detach()
            self._z_sum = self._z_sum + out.z.detach()
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self.global_step + 1  # the step this update completes
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.config.optim.grad_clip, foreach=True
        )
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        losses = torch.stack([self._ce_sum, self._z_sum]) / self.grad_accum
        self._ce_sum = self._z_sum = None
        if dist.is_available() and dist.is_initialized():  # mean over ranks; not strategy.reduce,
            dist.all_reduce(losses)  # whose barrier would make the host wait every step
            losses = losses / dist.get_world_size()
        values = torch.cat([losses, norm.reshape(1).float()])  # [ce, z, grad_norm]
        self.last_step_finite = values.isfinite().all()
        optimizer.found_inf = (~self.last_step_finite).float()  # fused AdamW skips if nonzero
        self._pending.append((step, optimizer.param_groups[0]["lr"], values))
        self.tokens_seen += self.tokens_per_step
        self.trainer.datamodule.consumed_global_batches += 1
        if self._flush_due(step):
            self.flush_metrics()

    def _flush_due(self, step: int) -> bool:
        """Logging steps, the last step, and checkpoint steps (which save exact counters and
        the spike-score windows: those must have seen every step up to the saved one)."""
        every_checkpoint = self.config.checkpoint.every_n_steps
        return (
            step % self.config.trainer.log_every_n_steps == 0
            or step >= self.trainer.max_steps
            or (every_checkpoint > 0 and step % every_checkpoint == 0)
        )

    def flush_metrics(self, progress_bar: bool = True) -> None:
        """Bring the pending steps' metrics over (one host sync), log every step, update the
        skip counters, and stop if too many steps in a row were skipped. ``progress_bar``:
        whether this hook may ``self.log`` (Lightning refuses it in checkpoint and end hooks)."""
        if not self._pending:
            return
        rows = torch.stack([values for _, _, values in self._pending]).tolist()
        tokens = self.tokens_seen - self.tokens_per_step * len(rows)
        flushed: list[dict[str, float]] = []
        diverged_at = None
        for (step, lr, _), (ce, z, grad_norm) in zip(self._pending, rows, strict=True):
            if all(map(_finite, (ce, z, grad_norm))):
                self.consecutive_skips = 0
            else:
                self.skipped_steps += 1
                self.consecutive_skips += 1
                if self.consecutive_skips >= self.config.optim.max_consecutive_skips:
                    diverged_at = diverged_at or step
            tokens += self.tokens_per_step
            flushed.append({
                "step": float(step),
                "train/loss": ce + z,
                "train/ce_loss": ce,
                "train/z_loss": z,
                "train/grad_norm": grad_norm,
                "train/lr": lr,
                "train/skipped_steps": float(self.skipped_steps),
                "train/tokens": float(tokens),
            })
        self._pending = []
        flushed[-1].update(self._throughput(len(rows)))
        for metrics in flushed:
            for logger in self.loggers:
                logger.log_metrics({k: v for k, v in metrics.items() if k != "step"},
                                   step=int(metrics["step"]))
            for listener in self.flush_listeners:
                listener(metrics)
        for logger in self.loggers:
            logger.save()  # CSVLogger would otherwise write only every 100 rows
        last = flushed[-1]
        if progress_bar:
            self.log("loss", last["train/loss"], prog_bar=True, logger=False)
            self.log("tok/s", last["perf/tokens_per_s"], prog_bar=True, logger=False)
        if diverged_at is not None:
            for logger in self.loggers:
                logger.save()
            raise TrainingDiverged(
                f"step {diverged_at}: {self.config.optim.max_consecutive_skips} optimizer steps in "
                f"a row had a non-finite loss or gradient norm (optim.max_consecutive_skips="
                f"{self.config.optim.max_consecutive_skips}); stopping. Their updates were skipped; "
                "lower optim.lr and resume from a checkpoint saved before the streak."
            )

    def _throughput(self, steps: int) -> dict[str, float]:
        """tokens/s and MFU over the ``steps`` optimizer steps since the previous flush (both
        timed right after a host sync, so the device's queue is accounted for)."""
        now = time.perf_counter()
        elapsed, self._window_start = now - self._window_start, now
        tokens_per_s = self.tokens_per_step * steps / elapsed
        metrics = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            total_peak = self.peak_flops * self.trainer.world_size
            metrics["perf/mfu"] = tokens_per_s * self.flops_per_token / total_peak
        return metrics

    def on_train_start(self) -> None:
        self._window_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Stopping through should_stop makes Lightning validate once more at the last step.
        if self.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(batch["input_ids"], labels=batch["labels"])
        self.log("val/loss", out.ce, on_epoch=True, sync_dist=True, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._val_started = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        self.log("step", float(self.global_step), sync_dist=True)
        # Validation time is not training time: shift the throughput window past it.
        self._window_start += time.perf_counter() - self._val_started

    def on_train_end(self) -> None:
        """Log what is still pending; generate a short sample from the final weights.

        The sample runs on the trained model as it is (under FSDP every rank takes part, and
        each block is gathered only while it runs), in the training precision: no rank ever
        holds an unsharded copy of the model.
        """
        self.flush_metrics(progress_bar=False)
        if self.config.trainer.sample_new_tokens == 0:
            return
        tokenizer = self.trainer.datamodule.tokenizer
        prompt = tokenizer.encode(self.config.trainer.sample_prompt).ids or [
            self.trainer.datamodule.eos_id
        ]
        with self.trainer.precision_plugin.forward_context():
            ids = generate(
                self.model,
                torch.tensor([prompt], device=self.device),
                self.config.trainer.sample_new_tokens,
                temperature=0.8,
                top_k=50,
                seed=self.config.seed,
            )
        self.sample_text = tokenizer.decode(ids[0].tolist())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoint steps were flushed in on_before_optimizer_step (before Lightning took the
        # callbacks' states, spike windows included); this covers saves at any other time.
        self.flush_metrics(progress_bar=False)
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
        # Lightning counts micro-batches, and their number per step depends on the world size of
        # the run that saved. Recount them for this run so that gradient accumulation and the
        # validation cadence stay aligned with optimizer steps (saves happen at step boundaries).
        micro = checkpoint["global_step"] * self.grad_accum
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        for counts in (progress["total"], progress["current"]):
            counts.update(ready=micro, started=micro, processed=micro, completed=micro - 1)
        states = checkpoint["rng_states"]
        # Same world size: each rank continues its own stream; otherwise all take rank 0's.
        rank = self.global_rank if len(states) == self.trainer.world_size else 0
        set_rng_states(states[rank])


class FlushMetricsOnException(L.Callback):
    """An interrupted run (Ctrl-C, an error) still logs the steps it completed: Lightning gives
    callbacks, not the module, ``on_exception``, before it finalizes the loggers."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: LanguageModelModule, exception: BaseException
    ) -> None:
        if isinstance(exception, TrainingDiverged):
            return  # flushed when it was raised
        try:
            pl_module.flush_metrics(progress_bar=False)
        except TrainingDiverged:
            pass  # the rows were logged; the run is failing anyway
        except Exception as e:  # the device may be what failed: the original error matters more
            warnings.warn(f"could not log the last steps' metrics: {e!r}", stacklevel=1)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


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
