"""Learning-rate sensitivity (Wortsman et al. 2023, §2.2) of each arm of an LR sweep: the one
analysis behind both front ends, ``analysis.sweep`` (run dirs of a Hydra multirun) and
``analysis.study`` (a plan's summary rows).

One number per arm says how much loss is lost, on average over the LR grid, against the
best LR, with diverged runs counted at the loss at init rather than at infinity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
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


def is_diverged(final: float, init: float, stopped_early: bool) -> bool:
    """Diverged: stopped on non-finite steps, a non-finite final loss, or one above the loss at
    init (the run ended worse than it started)."""
    return stopped_early or not math.isfinite(final) or final > init


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
