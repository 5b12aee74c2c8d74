"""Compare runs side by side: loss curves, per-layer q/k RMS and attention logits, final loss
against learning rate, and a Markdown table, so an ablation reads at a glance. Also what a run
gives LR sensitivity (its loss at init and final loss), an LR sweep's runs grouped into scored
arms, and the one final-loss-vs-LR figure of both sensitivity front ends."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from olmo_mini.analysis.runs import Run, experiment_keys
from olmo_mini.analysis.sensitivity import (
    Arm,
    GridRun,
    Trajectory,
    capped_loss,
    is_diverged,
    score_arms,
    trajectory,
)

LR_KEY = "optim.lr"
# (group, name) of the per-layer metrics drawn, one panel each when any run logged them.
LAYER_METRICS = (
    ("qk", "q_rms"),
    ("qk", "k_rms"),
    ("qk", "q_rms_pre"),
    ("qk", "k_rms_pre"),
    ("attn", "max_logit"),
    ("attn", "entropy"),
)
# What each per-layer metric measures: its panel's y-axis label.
_LAYER_UNITS = {
    "q_rms": "RMS of q (after QK-norm)",
    "k_rms": "RMS of k (after QK-norm)",
    "q_rms_pre": "RMS of q (before QK-norm)",
    "k_rms_pre": "RMS of k (before QK-norm)",
    "max_logit": "max attention logit",
    "entropy": "attention entropy (nats)",
}
# The layer is the color (one sequential colormap, with a colorbar); the run is the line style,
# then the marker.
_LAYER_COLORMAP = "viridis"
_RUN_LINESTYLES = ("-", "--", ":", "-.")
_RUN_MARKERS = (None, "o", "s", "^", "v", "D")
# Values whose largest is this many times their smallest span decades: a log (or symlog) axis.
_DECADES = 10.0
# Train losses averaged for the final loss when no validation ran at the end.
FINAL_TRAIN_WINDOW = 5


@dataclass(frozen=True)
class LossValue:
    """A loss and where it came from, so tables can say which definition applied."""

    value: float
    how: str


# Longer run names (wandb names made of a sweep's overrides) give way to the config differences.
MAX_NAME = 40


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Experiment config keys (dotted) whose values are not the same in every run."""
    configs = [experiment_keys(run.config) for run in runs]
    keys = sorted(set().union(*configs))
    return [k for k in keys if len({_canonical(c.get(k)) for c in configs}) > 1]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def describe(run: Run, keys: Sequence[str]) -> str:
    """``qk_norm=none, lr=0.01``: the values of ``keys``, by their last dotted part when unique."""
    short = [k.rsplit(".", 1)[-1] for k in keys]
    names = [s if short.count(s) == 1 else k for s, k in zip(short, keys, strict=True)]
    return ", ".join(
        f"{n}={_format_value(run.config.get(k))}" for n, k in zip(names, keys, strict=True)
    )


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_labels(runs: Sequence[Run], names: Sequence[str] | None = None) -> list[str]:
    """Given names, else each run's own name unless it is longer than ``MAX_NAME`` (a sweep's
    override string would cover the plot), else its config differences; made unique."""
    keys = differing_keys(runs)
    if names is not None and len(names) != len(runs):
        raise ValueError(f"{len(names)} names for {len(runs)} runs")
    labels = [
        (names[i] if names else "")
        or (run.name if run.name and len(run.name) <= MAX_NAME else "")
        or describe(run, keys)
        or Path(run.source).name
        for i, run in enumerate(runs)
    ]
    return [
        f"{label} ({Path(run.source).name})" if labels.count(label) > 1 else label
        for label, run in zip(labels, runs, strict=True)
    ]


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by their config differences other than the LR: the arms of an LR sweep."""
    keys = [k for k in differing_keys(runs) if k != LR_KEY]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(describe(run, keys) or "all runs", []).append(run)
    return groups


# The training cross-entropy without z-loss; runs logged before it existed have train/loss only.
TRAIN_CE_KEYS = ("train/ce_loss", "train/loss")


def training_losses(run: Run) -> tuple[str, np.ndarray, np.ndarray]:
    """The key, steps and values of the run's per-step training cross-entropy (z-loss
    excluded where the run logged it apart: ``train/ce_loss``)."""
    key = next((k for k in TRAIN_CE_KEYS if k in run.keys()), TRAIN_CE_KEYS[-1])
    return (key, *run.series(key))


def init_loss(run: Run) -> LossValue:
    """The loss at initialization: val/loss at step 0 when logged, else the first training
    cross-entropy (step 1's, computed before any update)."""
    steps, values = run.series("val/loss")
    if steps.size and steps[0] == 0:
        return LossValue(float(values[0]), "val/loss @ 0")
    key, steps, values = training_losses(run)
    if not steps.size:
        return LossValue(math.nan, f"no {key}")
    return LossValue(float(values[0]), f"{key} @ {steps[0]}")


def final_loss(run: Run) -> LossValue:
    """The last val/loss when validation ran at (or after) the last training step; otherwise the
    mean of the last ``FINAL_TRAIN_WINDOW`` training cross-entropies (non-finite if any of them
    is).

    A run that diverged and stopped early has no validation at its end; its earlier, healthy
    val/loss must not stand for the final loss, hence the train-loss fallback.
    """
    val_steps, val = run.series("val/loss")
    key, train_steps, train = training_losses(run)
    if val_steps.size and (not train_steps.size or val_steps[-1] >= train_steps[-1]):
        return LossValue(float(val[-1]), f"val/loss @ {val_steps[-1]}")
    if not train_steps.size:
        return LossValue(math.nan, "no loss logged")
    window = train[-FINAL_TRAIN_WINDOW:]
    first = train_steps[-len(window)]
    return LossValue(float(np.mean(window)), f"{key} mean @ {first}–{train_steps[-1]}")


def run_trajectory(run: Run, init: float, final: float, warmup_steps: int) -> Trajectory:
    """``sensitivity.trajectory`` of the run's training cross-entropy."""
    _, steps, losses = training_losses(run)
    return trajectory(steps, losses, init, final, warmup_steps)


def max_attention_logit(run: Run) -> tuple[float, int, int] | None:
    """The largest ``attn/layer*/max_logit`` over layers and steps: (value, layer, step).

    NaN values are skipped; an infinite one wins. None when the run never logged it.
    """
    best: tuple[float, int, int] | None = None
    for layer, (steps, values) in run.layer_series("attn", "max_logit").items():
        for step, value in zip(steps, values, strict=True):
            if not math.isnan(value) and (best is None or value > best[0]):
                best = (float(value), layer, int(step))
    return best


def analyze(runs: Sequence[Run]) -> list[Arm[Run]]:
    """Group ``runs`` into arms by their config differences other than the LR; score each."""
    missing = [run.source for run in runs if LR_KEY not in run.config]
    if missing:
        raise ValueError(f"runs without {LR_KEY} in their config: {', '.join(missing)}")
    grid = []
    for label, members in group_runs(runs).items():
        for run in members:
            init, final = init_loss(run).value, final_loss(run).value
            warmup = int(run.config.get("optim.warmup_steps", 0))
            path = run_trajectory(run, init, final, warmup)
            diverged = is_diverged(path, final, init, stopped_early=False)
            grid.append(
                GridRun(label, float(run.config[LR_KEY]), init, final, diverged, run.source, run)
            )
    return score_arms(grid)


def plot_losses(runs: Sequence[Run], labels: Sequence[str], path: Path) -> Path:
    """train/loss, and val/loss when any run has it, over steps: one line per run."""
    keys = ["train/loss"] + (["val/loss"] if any("val/loss" in r.keys() for r in runs) else [])
    fig = Figure(figsize=(6 * len(keys), 4))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        marker = "o" if key == "val/loss" else None
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            ax.plot(*run.series(key), label=label, color=f"C{i % 10}", marker=marker, markersize=3)
        ax.set(title=key, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def _run_style(i: int) -> dict[str, Any]:
    """Run ``i``'s line style, then marker (the color is the layer's)."""
    marker = _RUN_MARKERS[i // len(_RUN_LINESTYLES) % len(_RUN_MARKERS)]
    return {"linestyle": _RUN_LINESTYLES[i % len(_RUN_LINESTYLES)], "marker": marker}


def plot_layer_metrics(runs: Sequence[Run], labels: Sequence[str], path: Path) -> Path | None:
    """``layer_metrics_figure`` written to ``path``; None when no run logged any metric."""
    fig = layer_metrics_figure(runs, labels)
    if fig is None:
        return None
    return save_figure(fig, path)


def layer_metrics_figure(runs: Sequence[Run], labels: Sequence[str]) -> Figure | None:
    """A panel per per-layer metric, a line per (run, layer): the layer's color from one
    sequential colormap (the colorbar), the run's line style; a log axis where the values span
    decades. None when no run logged any of them."""
    metrics = [(g, n) for g, n in LAYER_METRICS if any(run.layer_series(g, n) for run in runs)]
    if not metrics:
        return None
    n_layers = 1 + max(
        (max(run.layer_series(g, n), default=0) for run in runs for g, n in metrics), default=0
    )
    cmap = colormaps[_LAYER_COLORMAP]
    norm = BoundaryNorm(np.arange(n_layers + 1) - 0.5, cmap.N)
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    # Constrained layout makes room for the colorbar and the legend below.
    fig = Figure(figsize=(5.5 * cols + 1, 4 * rows + 0.3 * math.ceil(len(labels) / 4)),
                 layout="constrained")  # fmt: skip
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (group, name) in zip(axes.flat, metrics, strict=False):
        drawn = []
        for i, run in enumerate(runs):
            for layer, (steps, values) in run.layer_series(group, name).items():
                ax.plot(steps, values, color=cmap(norm(layer)), linewidth=1.2, markersize=3,
                        **_run_style(i))  # fmt: skip
                drawn.append(values)
        if spans_decades(drawn):
            set_growth_scale(ax, drawn)
        ax.set(title=f"{group}/layer*/{name}", xlabel="step", ylabel=_LAYER_UNITS[name])
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes.ravel().tolist(), pad=0.01)
    bar.set_label("layer")
    bar.set_ticks(range(n_layers))
    handles = [
        Line2D([], [], color="black", label=label, **_run_style(i))
        for i, label in enumerate(labels)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8,
               title="run", title_fontsize=8)  # fmt: skip
    return fig


def spans_decades(arrays: Sequence[np.ndarray]) -> bool:
    """Whether the finite non-zero magnitudes span an order of magnitude or more."""
    values = np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays] or [np.empty(0)])
    magnitudes = np.abs(values[np.isfinite(values) & (values != 0)])
    return magnitudes.size > 0 and magnitudes.max() >= _DECADES * magnitudes.min()


def set_growth_scale(ax: Axes, arrays: Sequence[np.ndarray]) -> None:
    """A log axis for values spanning orders of magnitude; symlog if any is not positive."""
    values = np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays] or [np.empty(0)])
    values = values[np.isfinite(values)]
    ax.set_yscale("log" if values.size and values.min() > 0 else "symlog")


def line_style(i: int) -> dict[str, str]:
    """Line ``i``'s color and line style: ten colors, then the next style."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":")[i // 10 % 3]}


def plot_final_loss_vs_lr(arms: Sequence[Arm], path: Path) -> Path:
    """``final_loss_vs_lr_figure`` written to ``path``."""
    return save_figure(final_loss_vs_lr_figure(arms), path, dpi=100)


def final_loss_vs_lr_figure(arms: Sequence[Arm]) -> Figure:
    """Final loss against peak LR (log axis), a line per arm (a marker for an arm of one LR), at
    the values LR sensitivity counts: capped at the arm's loss at init; diverged runs are also
    marked with a cross."""
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    for i, arm in enumerate(arms):
        lrs = np.array(list(arm.finals))
        capped = np.array([capped_loss(v, arm.init_loss) for v in arm.finals.values()])
        if len(lrs) > 1:
            ax.plot(lrs, capped, **line_style(i), marker="o", markersize=4, label=arm.label)
        else:  # one LR: a point, not a line; the marker tells the arms apart
            marker = _RUN_MARKERS[1:][i % (len(_RUN_MARKERS) - 1)]
            color = line_style(i)["color"]
            ax.plot(lrs, capped, color=color, ls="none", marker=marker, ms=8, label=arm.label)
        bad = np.isin(lrs, arm.diverged_lrs)
        if bad.any():
            ax.plot(lrs[bad], capped[bad], "x", markersize=10, color=line_style(i)["color"])
    ax.set(
        xscale="log",
        xlabel=f"peak learning rate ({LR_KEY})",
        ylabel="final loss (capped at the loss at init)",
        title="final loss vs learning rate (x: diverged)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return fig


def summary_table(runs: Sequence[Run], labels: Sequence[str]) -> str:
    """Markdown: one row per run with its config differences (unless its label is them), final
    losses, max attention logit, spike scores and last step."""
    keys = differing_keys(runs)
    differences = [describe(run, keys) or "—" for run in runs]
    # The column only where it says more than the run's label (labels default to it).
    shown = differences != list(labels)
    columns = ["run", *(["config differences"] if shown else []), "final train loss",
               "final val loss", "max attn logit (layer, step)", "spike score loss %",
               "spike score grad %", "steps"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for run, label, difference in zip(runs, labels, differences, strict=True):
        peak = max_attention_logit(run)
        cells = [
            label,
            *([difference] if shown else []),
            _last(run, "train/loss"),
            _last(run, "val/loss"),
            "—" if peak is None else f"{_number(peak[0])} ({peak[1]}, {peak[2]})",
            _last(run, "stability/spike_score_loss"),
            _last(run, "stability/spike_score_grad"),
            str(run.final_step),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _last(run: Run, key: str) -> str:
    return _number(run.last(key)) if key in run.keys() else "—"


def _number(value: float) -> str:
    return f"{value:.4g}"


def compare_runs(
    runs: Sequence[Run], out_dir: str | Path, names: Sequence[str] | None = None
) -> list[Path]:
    """Write the figures and ``summary.md`` for ``runs`` into ``out_dir``; returns the paths."""
    if not runs:
        raise ValueError("no runs to compare")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs, names)
    written = [plot_losses(runs, labels, out / "loss.png")]
    layers = plot_layer_metrics(runs, labels, out / "layers.png")
    if layers is not None:
        written.append(layers)
    if LR_KEY in differing_keys(runs):
        written.append(plot_final_loss_vs_lr(analyze(runs), out / "final_loss_vs_lr.png"))
    lines = ["# Run comparison", "", summary_table(runs, labels)]
    lines += [
        "Final losses are the last logged values; spike scores the last logged "
        "(running) percentages.",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in written]
    notes = [
        f"- {label}: {note}" for run, label in zip(runs, labels, strict=True) for note in run.notes
    ]
    if notes:
        lines += ["", "## Notes", "", *notes]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return [*written, summary]


def save_figure(
    fig: Figure, path: Path, dpi: int = 110, rect: tuple[float, ...] | None = None
) -> Path:
    """Lay out ``fig`` (within ``rect``, leaving room for a figure legend; a figure with its
    own layout engine keeps it) and write it."""
    if fig.get_layout_engine() is None:
        fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    return path
