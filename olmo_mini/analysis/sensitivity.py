"""Learning-rate sensitivity (Wortsman et al. 2023, §2.2) of each arm of an LR sweep.

One number per arm says how much loss is lost, on average over the LR grid, against the
best LR, with diverged runs counted at the loss at init rather than at infinity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from olmo_mini.analysis.compare import (
    LR_KEY,
    LossValue,
    final_loss,
    group_runs,
    init_loss,
    max_attention_logit,
    plot_final_loss_vs_lr,
    save_figure,
    set_growth_scale,
)
from olmo_mini.analysis.runs import Run

log = logging.getLogger(__name__)

# Fewer LRs per arm than this cannot bracket the best one on both sides.
MIN_GRID_POINTS = 5


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


@dataclass
class Arm:
    """One arm of the sweep: its runs by LR, the loss at init and the resulting sensitivity."""

    label: str
    runs: dict[float, Run]
    finals: dict[float, LossValue]
    init_loss: float  # mean over the arm's runs; they share the model and seed, so the init
    sensitivity: float

    @property
    def best_lr(self) -> float:
        finite = {lr: f.value for lr, f in self.finals.items() if math.isfinite(f.value)}
        return min(finite, key=finite.__getitem__) if finite else math.nan


def analyze(runs: Sequence[Run]) -> list[Arm]:
    """Group ``runs`` into arms by their config differences other than the LR; score each."""
    missing = [run.source for run in runs if LR_KEY not in run.config]
    if missing:
        raise ValueError(f"runs without {LR_KEY} in their config: {', '.join(missing)}")
    arms = []
    for label, members in group_runs(runs).items():
        by_lr: dict[float, Run] = {}
        for run in members:
            lr = float(run.config[LR_KEY])
            if lr in by_lr:
                raise ValueError(
                    f"arm {label!r} has two runs at lr={lr:g}: {by_lr[lr].source} and {run.source}"
                )
            by_lr[lr] = run
        by_lr = dict(sorted(by_lr.items()))
        finals = {lr: final_loss(run) for lr, run in by_lr.items()}
        inits = [v for run in by_lr.values() if math.isfinite(v := init_loss(run).value)]
        if not inits:
            raise ValueError(f"arm {label!r}: no run logged a finite loss at init")
        init = float(np.mean(inits))
        sensitivity = lr_sensitivity({lr: f.value for lr, f in finals.items()}, init)
        arms.append(Arm(label, by_lr, finals, init, sensitivity))
    return arms


def plot_max_logit_grid(arms: Sequence[Arm], path: Path) -> Path | None:
    """Max attention logit per layer over steps: a row per arm, a column per LR, log axis."""
    if not any(run.layer_series("attn", "max_logit") for arm in arms for run in arm.runs.values()):
        return None
    lrs = sorted({lr for arm in arms for lr in arm.runs})
    fig = Figure(figsize=(2.8 * len(lrs), 2.4 * len(arms) + 0.6))
    axes = fig.subplots(len(arms), len(lrs), squeeze=False, sharex=True, sharey=True)
    cmap = colormaps["viridis"]
    drawn = []
    for row, arm in zip(axes, arms, strict=True):
        row[0].set_ylabel(f"{arm.label}\nmax attn logit", fontsize=8)
        for ax, lr in zip(row, lrs, strict=True):
            ax.set_title(f"lr={lr:g}", fontsize=9)
            ax.grid(alpha=0.3)
            run = arm.runs.get(lr)
            layers = run.layer_series("attn", "max_logit") if run else {}
            for j, (layer, (steps, values)) in enumerate(layers.items()):
                shade = cmap(j / max(1, len(layers) - 1))
                ax.plot(steps, values, color=shade, linewidth=1.1, label=f"layer {layer}")
                drawn.append(values)
    set_growth_scale(axes[0][0], drawn)  # shared by every panel
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    handles, labels = max(
        (ax.get_legend_handles_labels() for ax in axes.flat), key=lambda h: len(h[0])
    )
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=8)
    return save_figure(fig, path, dpi=100, rect=(0, 0.06, 1, 1))


def report(arms: Sequence[Arm], figures: Sequence[Path]) -> str:
    """Markdown: a summary row per arm, then each arm's runs by LR."""
    lines = [
        "# LR sensitivity",
        "",
        "LR sensitivity = mean over the arm's LR grid of min(final loss, loss at init) − best "
        "loss (Wortsman et al. 2023, §2.2); a non-finite final loss counts as the loss at init.",
        "",
        "- *final loss*: the last val/loss when validation ran at or after the last training "
        "step, else the mean of the last train losses (a run that stopped early on divergence "
        "is scored by its last training losses, not by an earlier healthy validation).",
        "- *loss at init*: val/loss at step 0 when logged, else the first logged train loss; "
        "averaged over the arm's runs.",
        "",
        "| arm | runs | loss at init | best lr | best final loss | LR sensitivity |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        best = arm.best_lr
        best_loss = arm.finals[best].value if math.isfinite(best) else math.nan
        lines.append(
            f"| {arm.label} | {len(arm.runs)} | {arm.init_loss:.4f} | {best:g} | "
            f"{best_loss:.4f} | **{arm.sensitivity:.4f}** |"
        )
    warnings = grid_warnings(arms)
    if warnings:
        lines += ["", *[f"- **Warning**: {w}" for w in warnings]]
    for arm in arms:
        lines += [
            "",
            f"## {arm.label}",
            "",
            "| lr | final loss | from | capped | steps | max attn logit (layer, step) | run |",
            "|---|---|---|---|---|---|---|",
        ]
        for lr, run in arm.runs.items():
            final = arm.finals[lr]
            capped = capped_loss(final.value, arm.init_loss)
            peak = max_attention_logit(run)
            peak_cell = "—" if peak is None else f"{peak[0]:.4g} ({peak[1]}, {peak[2]})"
            lines.append(
                f"| {lr:g} | {final.value:.4f} | {final.how} | {capped:.4f} | "
                f"{run.final_step} | {peak_cell} | {run.source} |"
            )
        lines += [f"- {note}" for run in arm.runs.values() for note in run.notes]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in figures]]
    return "\n".join(lines) + "\n"


def grid_warnings(arms: Sequence[Arm]) -> list[str]:
    """Arms whose grid cannot locate the best LR: too few points, or the best at an end."""
    warnings = []
    for arm in arms:
        lrs = list(arm.runs)
        if len(lrs) < MIN_GRID_POINTS:
            warnings.append(
                f"arm {arm.label!r} has {len(lrs)} learning rates; with fewer than "
                f"{MIN_GRID_POINTS} its best LR and LR sensitivity mean little (Wortsman et al. "
                "use 7 per arm)"
            )
        elif arm.best_lr in (lrs[0], lrs[-1]):
            warnings.append(
                f"arm {arm.label!r}: the best LR ({arm.best_lr:g}) is at the end of its grid, so "
                "the optimum may lie outside it; extend the grid past it"
            )
    return warnings


def write_report(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Final loss vs LR per arm, the max-logit grid and ``lr_sensitivity.md`` in ``out_dir``;
    grids too small to rank arms are a warning on stderr and in the report."""
    arms = analyze(runs)
    for warning in grid_warnings(arms):
        log.warning(f"warning: {warning}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = {a.label: list(a.runs.values()) for a in arms}
    figures = [plot_final_loss_vs_lr(groups, out / "final_loss_vs_lr.png")]
    grid = plot_max_logit_grid(arms, out / "max_logit_by_layer.png")
    if grid is not None:
        figures.append(grid)
    path = out / "lr_sensitivity.md"
    path.write_text(report(arms, figures))
    return [*figures, path]
