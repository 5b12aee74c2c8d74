"""Learning-rate sensitivity (Wortsman et al. 2023, §2.2) of each arm of an LR sweep: the one
analysis behind both front ends, ``analysis.sweep`` (run dirs of a Hydra multirun) and
``analysis.study`` (a plan's summary rows).

One number per arm says how much loss is lost, on average over the LR grid, against the
best LR, with diverged runs counted at the loss at init rather than at infinity.

Whether a run diverged is judged on its whole training trajectory (``Trajectory``), not only
on where it ended: a run that sat above its loss at init for much of its training and came
back only when the schedule's decay lowered the LR blew up, whatever its final loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


def capped_loss(loss: float, init_loss: float) -> float:
    """A final loss as LR sensitivity counts it: at most the loss at init, which also stands
    in for a non-finite one."""
    return min(loss, init_loss) if math.isfinite(loss) else init_loss


def lr_sensitivity(final_losses_by_lr: Mapping[float, float], init_loss: float) -> float:
    """Mean over the grid of min(final loss, loss at init) − best loss.

    A non-finite final loss counts as the loss at init. The best loss is the minimum of the
    capped values: the same as the paper's minimum over the grid whenever any run ends below
    its loss at init.
    """
    if not final_losses_by_lr:
        raise ValueError("LR sensitivity needs at least one run")
    if not math.isfinite(init_loss):
        raise ValueError(f"the loss at init must be finite, got {init_loss}")
    capped = [capped_loss(loss, init_loss) for loss in final_losses_by_lr.values()]
    return float(np.mean(capped) - min(capped))


def ended_diverged(final: float, init: float, stopped_early: bool) -> bool:
    """The final-loss-only rule (this study's first two editions): stopped on non-finite steps,
    a non-finite final loss, or one above the loss at init (ended worse than it started)."""
    return stopped_early or not math.isfinite(final) or final > init


# A run above its loss at init on more than this share of its steps after warmup diverged,
# even when it ended below it: worse than the untrained model for a tenth of its training is
# a blow-up, not a spike (a spike is back below init within a few steps).
DIVERGED_SHARE_ABOVE_INIT = 0.1


@dataclass(frozen=True)
class Trajectory:
    """A run's training cross-entropy (z-loss excluded) against its loss at init, per step."""

    max_loss: float  # the largest finite training loss (NaN if none was finite)
    max_loss_step: int  # its step; -1 if none
    non_finite_steps: int
    # Steps after warmup above the loss at init (a non-finite loss counts as above) and their
    # share of the steps after warmup (NaN when the run never left warmup).
    steps_above_init: int
    share_above_init: float
    first_above_init: int  # the first such step; -1 if none
    recovered: bool  # above init after warmup at some step, yet the final loss is below init


def trajectory(
    steps: Sequence[int] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    init_loss: float,
    final_loss: float,
    warmup_steps: int,
) -> Trajectory:
    """The trajectory outcomes of one run from its per-step training losses; steps are the
    1-based optimizer steps, so step ``s`` is after warmup when ``s > warmup_steps``."""
    steps, losses = np.asarray(steps, dtype=np.int64), np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(losses)
    after = steps > warmup_steps
    above = after & ~(losses <= init_loss)  # NaN and inf compare False: counted as above
    n_after = int(after.sum())
    peak = int(np.argmax(np.where(finite, losses, -np.inf))) if finite.any() else -1
    first = int(steps[above][0]) if above.any() else -1
    return Trajectory(
        max_loss=float(losses[peak]) if peak >= 0 else math.nan,
        max_loss_step=int(steps[peak]) if peak >= 0 else -1,
        non_finite_steps=int((~finite).sum()),
        steps_above_init=int(above.sum()),
        share_above_init=float(above.sum() / n_after) if n_after else math.nan,
        first_above_init=first,
        recovered=first >= 0 and final_loss < init_loss,
    )


def is_diverged(path: Trajectory, final: float, init: float, stopped_early: bool) -> bool:
    """Diverged, judged on the trajectory: the final-loss rule (``ended_diverged``), or any
    non-finite training loss, or above the loss at init on more than
    ``DIVERGED_SHARE_ABOVE_INIT`` of the steps after warmup."""
    return (
        ended_diverged(final, init, stopped_early)
        or path.non_finite_steps > 0
        or path.share_above_init > DIVERGED_SHARE_ABOVE_INIT
    )


@dataclass(frozen=True)
class GridRun(Generic[T]):
    """One run of an LR sweep as LR sensitivity sees it; ``run`` is the front end's record."""

    arm: str
    lr: float
    init_loss: float
    final_loss: float
    diverged: bool
    source: str  # names the run in errors
    run: T


@dataclass
class Arm(Generic[T]):
    """One arm of the sweep: its runs and final losses by LR (ascending), the loss at init and
    the resulting sensitivity."""

    label: str
    runs: dict[float, T]
    finals: dict[float, float]
    init_loss: float  # mean over the arm's runs; they share the model and seed, so the init
    sensitivity: float
    diverged_lrs: list[float]

    @property
    def best_lr(self) -> float:
        finite = {lr: v for lr, v in self.finals.items() if math.isfinite(v)}
        return min(finite, key=finite.__getitem__) if finite else math.nan

    @property
    def best_loss(self) -> float:
        return self.finals.get(self.best_lr, math.nan)


def score_arms(grid: Iterable[GridRun[T]]) -> list[Arm[T]]:
    """The runs grouped by arm (in order of first appearance), each scored; an arm with two
    runs at one LR, or none with a finite loss at init, is an error."""
    by_arm: dict[str, dict[float, GridRun[T]]] = {}
    for point in grid:
        by_lr = by_arm.setdefault(point.arm, {})
        if point.lr in by_lr:
            raise ValueError(
                f"arm {point.arm!r} has two runs at lr={point.lr:g}, {by_lr[point.lr].source} and "
                f"{point.source}: with two runs at one LR its sensitivity is ambiguous"
            )
        by_lr[point.lr] = point
    arms = []
    for label, by_lr in by_arm.items():
        points = [by_lr[lr] for lr in sorted(by_lr)]
        inits = [p.init_loss for p in points if math.isfinite(p.init_loss)]
        if not inits:
            raise ValueError(f"arm {label!r}: no run has a finite loss at init")
        init = float(np.mean(inits))
        finals = {p.lr: p.final_loss for p in points}
        arms.append(
            Arm(
                label=label,
                runs={p.lr: p.run for p in points},
                finals=finals,
                init_loss=init,
                sensitivity=lr_sensitivity(finals, init),
                diverged_lrs=[p.lr for p in points if p.diverged],
            )
        )
    return arms
