"""The LR-sensitivity report of a sweep's run dirs (``tools/lr_sensitivity.py``): the arms of
``compare.analyze`` in a table, final loss against LR and the max attention logit per layer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from olmo_mini.analysis.compare import (
    analyze,
    final_loss,
    max_attention_logit,
    plot_final_loss_vs_lr,
    save_figure,
    set_growth_scale,
)
from olmo_mini.analysis.runs import Run
from olmo_mini.analysis.sensitivity import DIVERGED_SHARE_ABOVE_INIT, Arm, capped_loss

log = logging.getLogger(__name__)

# Fewer LRs per arm than this cannot bracket the best one on both sides.
MIN_GRID_POINTS = 5


def plot_max_logit_grid(arms: Sequence[Arm[Run]], path: Path) -> Path | None:
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


def report(arms: Sequence[Arm[Run]], figures: Sequence[Path]) -> str:
    """Markdown: a summary row per arm, then each arm's runs by LR."""
    lines = [
        "# LR sensitivity",
        "",
        "LR sensitivity = mean over the arm's LR grid of min(final loss, loss at init) − best "
        "loss (Wortsman et al. 2023, §2.2); a non-finite final loss counts as the loss at init.",
        "",
        "- *final loss*: the last val/loss when validation ran at or after the last training "
        "step, else the mean of the last training cross-entropies (a run that stopped early on "
        "divergence is scored by its last training losses, not by an earlier healthy "
        "validation).",
        "- *loss at init*: val/loss at step 0 when logged, else the first logged training "
        "cross-entropy (z-loss excluded); averaged over the arm's runs.",
        "- *diverged* (crossed in the figure): a non-finite training loss, a final loss above "
        "the loss at init, or a training loss above it on more than "
        f"{DIVERGED_SHARE_ABOVE_INIT:.0%} of the steps after warmup.",
        "",
        "| arm | runs | loss at init | best lr | best final loss | LR sensitivity |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        lines.append(
            f"| {arm.label} | {len(arm.runs)} | {arm.init_loss:.4f} | {arm.best_lr:g} | "
            f"{arm.best_loss:.4f} | **{arm.sensitivity:.4f}** |"
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
            final = final_loss(run)
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


def grid_warnings(arms: Sequence[Arm[Run]]) -> list[str]:
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
    figures = [plot_final_loss_vs_lr(arms, out / "final_loss_vs_lr.png")]
    grid = plot_max_logit_grid(arms, out / "max_logit_by_layer.png")
    if grid is not None:
        figures.append(grid)
    path = out / "lr_sensitivity.md"
    path.write_text(report(arms, figures))
    return [*figures, path]
