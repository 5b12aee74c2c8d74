"""What the stability monitor costs: training throughput with and without it, side by side.

    python tools/bench_stability.py                      # olmo2_tiny, default batch, 40 steps
    python tools/bench_stability.py model=olmo2_small trainer.accelerator=gpu --steps 60

Runs the real trainer (``olmo_mini.training.train``) in this process, alternating monitored
and unmonitored runs of the same config so that machine noise hits both alike, and times
optimizer steps after a warm-up. The monitor measures on step 1 and every
``stability.every_n_steps`` steps, so over a run it costs its per-measurement price
divided by that interval.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from olmo_mini.bench.harness import (
    device_name,
    json_line,
    markdown_table,
    parser,
    quiet_run,
    time_trainer,
)
from olmo_mini.config import compose_config, compose_or_exit


@dataclass
class OverheadResult:
    steps_per_s_off: float
    steps_per_s_on: float
    tokens_per_step: int
    every_n_steps: int
    overhead: float = field(init=False)
    """Fraction of throughput lost to monitoring."""

    def __post_init__(self) -> None:
        self.overhead = 1.0 - self.steps_per_s_on / self.steps_per_s_off


def measure_overhead(
    overrides: list[str], steps: int = 40, warmup: int = 5, repeats: int = 2
) -> OverheadResult:
    """Median steps/s with the monitor off and on over ``repeats`` interleaved pairs of runs,
    each over the steps after the first ``warmup``."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for enabled in (False, True):
            config = compose_config(
                [*quiet_run(steps, overrides), *overrides, f"stability.enabled={enabled}"]
            )
            seconds = time_trainer(config)[max(warmup, 1) - 1 :]  # the first step has no time
            rates[enabled].append(len(seconds) / sum(seconds))
    return OverheadResult(
        statistics.median(rates[False]),
        statistics.median(rates[True]),
        config.data.global_batch_size * config.data.seq_len,
        config.stability.every_n_steps,
    )


def main(argv: list[str] | None = None) -> int:
    """``tools/bench_stability.py``: a markdown table, the overhead, then one JSON line."""
    cli = parser(__doc__)
    cli.add_argument("overrides", nargs="*", help="train.py overrides (key=value)")
    cli.add_argument("--steps", type=int, default=40)
    cli.add_argument("--warmup", type=int, default=5)
    cli.add_argument("--repeats", type=int, default=2)
    args = cli.parse_args(argv)
    if args.steps < 2 or not 0 <= args.warmup < args.steps:
        raise SystemExit(
            f"error: need --steps >= 2 and 0 <= --warmup < --steps, got --steps {args.steps} --warmup {args.warmup}"
        )
    compose_or_exit(args.overrides)  # a bad override: one error line before anything runs
    result = measure_overhead(args.overrides, args.steps, args.warmup, args.repeats)
    rates = {"off": result.steps_per_s_off, "on": result.steps_per_s_on}
    rows = [(name, f"{r:.3f}", f"{r * result.tokens_per_step:,.0f}") for name, r in rates.items()]
    print(f"machine: {device_name(torch.device('cpu'))}")
    print(markdown_table(["monitor", "steps/s", "tokens/s"], rows, numeric=2))
    every = result.every_n_steps
    print(f"overhead at stability.every_n_steps={every}: {100 * result.overhead:.1f}%")
    print(json_line(result))
    return 0
