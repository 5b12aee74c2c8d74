"""Every callback of a training run, in one list whose order is the contract.

``build_callbacks`` returns them in the order Lightning calls them (always before the module's
own hook), which is also the order of their ``pre_log_metrics`` hooks (after the module's).
What depends on it:

1. ``FinalFlush`` first: the end of training and an error log the pending steps before
   anything else ends (the sample, the console).
2. ``QKClip``, then ``StabilityMonitor``, then ``StepCheckpoint`` (on a step's end): the
   monitor's update ratios include the clip's rescale, and the checkpoint, which flushes before
   saving, sees both callbacks' metrics of the step and saves the clipped weights.
3. ``StepCheckpoint`` before ``StopOnSignal``: a signal's save reuses the step's checkpoint.
4. ``Throughput`` before ``ConsoleProgress``: the progress line reads the window's tokens/s.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from olmo_mini.config import TrainConfig
from olmo_mini.model.generation import generate
from olmo_mini.sizing.flops import flops_per_token
from olmo_mini.stability.monitor import StabilityMonitor
from olmo_mini.training.checkpoint import StepCheckpoint
from olmo_mini.training.console import ConsoleProgress
from olmo_mini.training.interrupt import StopOnSignal
from olmo_mini.training.module import LanguageModelModule, TrainingDiverged
from olmo_mini.training.qk_clip import QKClip
from olmo_mini.training.recorder import Rows
from olmo_mini.training.tokenizer_record import RecordTokenizer


def build_callbacks(
    config: TrainConfig,
    run_dir: Path,
    precision: str,
    peak_flops: float | None,
    checkpoint: StepCheckpoint,
    extra: Sequence[L.Callback] = (),
) -> list[L.Callback]:
    """The run's callbacks in their order (see the module docstring); ``extra`` (benchmarks'
    and tests' timers) go after the checkpoint and before the metrics readers."""
    tau = config.optim.qk_clip_tau
    sample = config.trainer.sample_new_tokens
    return [
        FinalFlush(),
        RecordTokenizer(run_dir),
        *([] if tau is None else [QKClip(tau, config.model)]),
        *([StabilityMonitor(config.stability)] if config.stability.enabled else []),
        checkpoint,
        StopOnSignal(checkpoint, config.checkpoint.requeue_signal),
        *extra,
        Throughput(config, peak_flops),
        *([EndOfRunSample(config.trainer.sample_prompt, sample, config.seed)] if sample else []),
        ConsoleProgress(config, precision, bar=config.trainer.progress_bar),
    ]


class FinalFlush(L.Callback):
    """Logs what is still pending when training ends, before the other callbacks' end hooks
    (the sample, the console), and when it fails (Ctrl-C, an error): Lightning gives callbacks,
    not the module, ``on_exception``, before it finalizes the loggers."""

    def on_train_end(self, trainer: L.Trainer, pl_module: LanguageModelModule) -> None:
        pl_module.flush_metrics()

    def on_exception(
        self, trainer: L.Trainer, pl_module: LanguageModelModule, exception: BaseException
    ) -> None:
        if isinstance(exception, TrainingDiverged):
            return  # flushed when it was raised
        try:  # only this rank may be failing: no collective
            pl_module.flush_metrics(collective=False)
        except TrainingDiverged:
            pass  # the rows were logged; the run is failing anyway
        except Exception as e:  # the device may be what failed: the original error matters more
            warnings.warn(f"could not log the last steps' metrics: {e!r}", stacklevel=1)


class Throughput(L.Callback):
    """``perf/tokens_per_s`` and ``perf/mfu`` over the training steps of each flush, timed at
    the flush (right after its host sync, so the device's queue is accounted for), with
    validation time left out. MFU = tokens/s x FLOPs per token / (peak x devices)."""

    def __init__(self, config: TrainConfig, peak_flops: float | None) -> None:
        self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
        self.flops_per_token = flops_per_token(config.model, config.data.seq_len)
        self.peak_flops = peak_flops
        self._world_size = 1
        self._window_start = self._val_started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._world_size = trainer.world_size
        self._window_start = time.perf_counter()

    def on_validation_epoch_start(self, *args: object) -> None:
        self._val_started = time.perf_counter()

    def on_validation_epoch_end(self, *args: object) -> None:
        self._window_start += time.perf_counter() - self._val_started

    def pre_log_metrics(self, rows: Rows) -> None:
        steps = [step for step, row in rows.items() if "train/loss" in row]
        if not steps:
            return
        now = time.perf_counter()
        elapsed, self._window_start = now - self._window_start, now
        tokens_per_s = self.tokens_per_step * len(steps) / elapsed
        row = rows[steps[-1]]
        row["perf/tokens_per_s"] = tokens_per_s
        if self.peak_flops:
            total_peak = self.peak_flops * self._world_size
            row["perf/mfu"] = tokens_per_s * self.flops_per_token / total_peak


class EndOfRunSample(L.Callback):
    """A short sample from the final weights, kept in ``text``.

    It runs on the trained model as it is (under FSDP every rank takes part, and each block is
    gathered only while it runs), in the training precision: no rank ever holds an unsharded
    copy of the model.
    """

    def __init__(self, prompt: str, new_tokens: int, seed: int) -> None:
        self.prompt, self.new_tokens, self.seed = prompt, new_tokens, seed
        self.text: str | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: LanguageModelModule) -> None:
        tokenizer = trainer.datamodule.tokenizer
        ids = tokenizer.encode(self.prompt).ids or [trainer.datamodule.eos_id]
        prompt = torch.tensor([ids], device=pl_module.device)
        with trainer.precision_plugin.forward_context():
            out = generate(
                pl_module.model, prompt, self.new_tokens, temperature=0.8, top_k=50, seed=self.seed
            )
        self.text = tokenizer.decode(out[0].tolist())
