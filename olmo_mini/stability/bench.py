"""What the stability monitor costs: training throughput with and without it, side by side.

Runs the real trainer (``olmo_mini.training.train``) in this process, alternating monitored
and unmonitored runs of the same config so that machine noise hits both alike, and times
optimizer steps after a warm-up. The monitor measures on step 1 and every
``stability.every_n_steps`` steps, so over a run it costs its per-measurement price
divided by that interval.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from olmo_mini.config import compose_config


class StepTimer(L.Callback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.times.setdefault(trainer.global_step, time.perf_counter())

    def seconds_per_step(self, skip: int) -> float:
        steps = sorted(s for s in self.times if s >= skip)
        return (self.times[steps[-1]] - self.times[steps[0]]) / (steps[-1] - steps[0])


@dataclass
class OverheadResult:
    steps_per_s_off: float
    steps_per_s_on: float
    tokens_per_step: int
    every_n_steps: int

    @property
    def overhead(self) -> float:
        """Fraction of throughput lost to monitoring."""
        return 1.0 - self.steps_per_s_on / self.steps_per_s_off


def measure_overhead(
    overrides: list[str], steps: int = 40, warmup: int = 5, repeats: int = 2
) -> OverheadResult:
    """Median steps/s with the monitor off and on over ``repeats`` interleaved pairs of runs."""
    from olmo_mini.training import train

    fixed = [
        "logger=none", "checkpoint.every_n_steps=0", "checkpoint.save_final=false",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps + 1}",
        "trainer.progress_bar=false", "trainer.sample_new_tokens=0",
    ]
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for enabled in (False, True):
            config = compose_config([*fixed, *overrides, f"stability.enabled={enabled}"])
            timer = StepTimer()
            with tempfile.TemporaryDirectory() as run_dir:
                train(config, Path(run_dir), callbacks=[timer])
            rates[enabled].append(1.0 / timer.seconds_per_step(skip=warmup))
    return OverheadResult(
        statistics.median(rates[False]),
        statistics.median(rates[True]),
        config.data.global_batch_size * config.data.seq_len,
        config.stability.every_n_steps,
    )
