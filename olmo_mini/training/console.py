"""What a run says while it trains: a config summary, progress in optimizer steps with tokens/s
and ETA, validation losses and a CPU time estimate, all through ``logging`` (rank zero), so the
console and ``<run dir>/train.log`` tell the same story.

On a terminal a tqdm bar counts optimizer steps and the lines print above it; when stdout is
not a terminal (a pipe, a batch job's log) only the lines are written, with no ``\\r`` frames.
Progress reads only values the module already brought to the host on its logging steps, so
it adds no host sync.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from olmo_mini.config import TrainConfig
from olmo_mini.stepping import StepCallback

log = logging.getLogger(__name__)

# Steps timed for the CPU estimate, after the run's first step (which pays for warm-up).
_ESTIMATE_STEPS = 2
# About this many progress lines per run (on logging steps).
_LINES_PER_RUN = 10
# olmo2_tiny's size, rounded up: larger models get it suggested for long CPU runs.
_TINY_PARAMS = 6_000_000
# Longer than this on CPU: suggest a GPU or a smaller model.
_LONG_RUN_S = 15 * 60


class ConsoleProgress(StepCallback):
    """Logs the run's story on rank zero (a progress line about every tenth of the run, on a
    logging step); with ``bar``, a tqdm bar in optimizer steps when stdout is a terminal."""

    def __init__(self, config: TrainConfig, precision: str, bar: bool) -> None:
        super().__init__()
        self.config = config
        self.precision = precision
        self.bar_enabled = bar and sys.stdout.isatty()
        self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
        self._bar: tqdm | None = None
        self._exit = ExitStack()
        self._start_step = self._max_steps = self._params = 0
        self._first_step_end = 0.0
        self._line_every = 1

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        self._params = model.num_params()
        non_embedding = model.num_params(exclude_embeddings=True)
        log.info(summary(self.config, self.precision, trainer, self._params, non_embedding))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step
        self._max_steps = trainer.max_steps
        every = self.config.trainer.log_every_n_steps
        self._line_every = every * max(1, -(-self._max_steps // (_LINES_PER_RUN * every)))
        if trainer.is_global_zero and self.bar_enabled:
            self._exit.enter_context(logging_redirect_tqdm())
            self._bar = self._exit.enter_context(
                tqdm(
                    total=trainer.max_steps,
                    initial=trainer.global_step,
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stdout,
                )
            )

    def post_optim_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if not trainer.is_global_zero:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        if step == self._start_step + 1:
            self._first_step_end = time.perf_counter()
        elif step == self._start_step + 1 + _ESTIMATE_STEPS:
            self._estimate(trainer, step)

    def _estimate(self, trainer: L.Trainer, step: int) -> None:
        """On CPU, one line with the run's expected training time from the steps just timed."""
        if trainer.strategy.root_device.type != "cpu":
            return
        per_step = (time.perf_counter() - self._first_step_end) / _ESTIMATE_STEPS
        total = per_step * (self._max_steps - self._start_step)
        line = (
            f"estimated training time on CPU: {_duration(total)} for "
            f"{self._max_steps - self._start_step} steps ({per_step:.2f} s/step, steps "
            f"{step - _ESTIMATE_STEPS + 1}-{step})"
        )
        if total > _LONG_RUN_S:
            smaller = " or model=olmo2_tiny" if self._params > _TINY_PARAMS else ""
            line += f"; a GPU, fewer trainer.max_steps{smaller} would be faster"
        log.info(line)

    @rank_zero_only
    def pre_log_metrics(self, rows: dict[int, dict[str, float]]) -> None:
        """Progress lines from flushed steps (the last training step of a flush carries the
        window's tokens/s) and validation losses."""
        for step, row in rows.items():
            tokens_per_s = row.get("perf/tokens_per_s")
            if tokens_per_s is not None:
                self._progress(step, row["train/loss"], tokens_per_s)
            if "val/loss" in row:
                log.info(f"step {step}: val/loss {row['val/loss']:.4f}")

    def _progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step % self._line_every and step < self._max_steps:
            return
        eta = (self._max_steps - step) * self.tokens_per_step / tokens_per_s
        log.info(
            f"step {step}/{self._max_steps} | loss {loss:.4f} | "
            f"{tokens_per_s:,.0f} tok/s | ETA {_duration(eta)}"
        )

    def on_train_end(self, *args: object) -> None:
        self._bar = None
        self._exit.close()

    on_exception = on_train_end  # the bar and the log redirection end on failure too


def summary(
    config: TrainConfig, precision: str, trainer: L.Trainer, params: int, non_embedding: int
) -> str:
    """One line: model size, tokens per step, steps, precision, devices and threads."""
    data = config.data
    device = trainer.strategy.root_device.type
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n > 1 else ''} each" if device == "cpu" else ""
    return (
        f"model: {params / 1e6:.1f}M parameters ({non_embedding / 1e6:.1f}M non-embedding) | "
        f"{data.global_batch_size} × {data.seq_len} = {data.global_batch_size * data.seq_len:,} "
        f"tokens/step | {trainer.max_steps} steps | {precision} | "
        f"{trainer.world_size} {device} process{'es' if trainer.world_size > 1 else ''}{threads}"
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
