"""compare_runs on runs the test logs: figures written, table numbers right, labels and the
final-loss rule."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import wandb
import yaml
from lightning.pytorch.loggers import WandbLogger

from olmo_mini.analysis.compare import (
    final_loss,
    final_loss_vs_lr_figure,
    init_loss,
    layer_metrics_figure,
    run_labels,
    spans_decades,
)
from olmo_mini.analysis.runs import Run, load_run
from olmo_mini.analysis.sensitivity import Arm
from tests.analysis.test_runs import write_csv_run

TOOL = Path(__file__).parents[2] / "tools" / "compare_runs.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows(
    train: list[float],
    val_at_end: float | None,
    logits: dict[tuple[int, int], float],
    spikes: tuple[float, float] | None = None,
) -> list[dict[str, float]]:
    """Steps 0, 10, ... with the given train losses; max logit 1.0 except at (layer, step)."""
    out = []
    for i, loss in enumerate(train):
        step = 10 * i
        row = {"step": step, "train/loss": loss}
        for layer in range(2):
            row[f"attn/layer{layer}/max_logit"] = logits.get((layer, step), 1.0)
            row[f"qk/layer{layer}/q_rms"] = 1.0 + layer
            row[f"qk/layer{layer}/k_rms"] = 0.5 + layer
        out.append(row)
    if val_at_end is not None:
        out.append({"step": out[-1]["step"], "val/loss": val_at_end})
    if spikes is not None:
        out[-1].update(
            {"stability/spike_score_loss": spikes[0], "stability/spike_score_grad": spikes[1]}
        )
    return out


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("compare")
    wandb_dir = root / "wandb_run"
    (wandb_dir / ".hydra").mkdir(parents=True)
    config = {"optim": {"lr": 1e-3}, "model": {"qk_norm": "full"}, "logger": {"kind": "wandb"}}
    (wandb_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    logger = WandbLogger(offline=True, save_dir=str(wandb_dir), project="t")
    logger.log_hyperparams(config)
    for row in rows([5.0, 4.0, 3.0, 2.5, 2.25], 2.3, {(1, 30): 50.0}, spikes=(0.5, 1.0)):
        logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    logger.experiment.finish()
    wandb.teardown()  # wait for wandb's service to flush the run file before reading it
    high_lr = write_csv_run(
        root / "csv_high_lr",
        {"optim": {"lr": 1e-2}, "model": {"qk_norm": "full"}},
        rows([5.0, 3.5, 2.5, 2.1, 2.0], 2.1, {(0, 20): 1e3}),
    )
    diverged = write_csv_run(
        root / "csv_diverged",
        {"optim": {"lr": 1e-3}, "model": {"qk_norm": "none"}},
        rows([5.0, 4.0, 3.0, 8.0, math.nan], None, {(0, 30): math.inf, (1, 20): math.nan}),
    )
    return [wandb_dir, high_lr, diverged]


def parse_table(markdown: str) -> dict[str, list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])
    }


def test_compare_runs_writes_figures_and_the_summary_table(run_dirs, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert runpy.run_path(str(TOOL))["main"]([*map(str, run_dirs), "--out", str(out)]) == 0
    names = ["loss.png", "layers.png", "final_loss_vs_lr.png", "summary.md"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in names]
    for name in names[:-1]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(out / name).shape[2] == 4
    table = parse_table((out / "summary.md").read_text())
    # run (its config differences, so no column repeats them), final train, final val, max logit
    # (layer, step), spikes, steps
    assert "config differences" not in (out / "summary.md").read_text()
    assert table == {
        "qk_norm=full, lr=0.001": [
            "2.25",
            "2.3",
            "50 (1, 30)",
            "0.5",
            "1",
            "40",
        ],
        "qk_norm=full, lr=0.01": [
            "2",
            "2.1",
            "1000 (0, 20)",
            "—",
            "—",
            "40",
        ],
        "qk_norm=none, lr=0.001": [
            "nan",
            "—",
            "inf (0, 30)",
            "—",
            "—",
            "40",
        ],
    }


def test_compare_runs_uses_given_names_and_reports_read_errors(run_dirs, tmp_path, capsys) -> None:
    main = runpy.run_path(str(TOOL))["main"]
    out = tmp_path / "named"
    assert main([str(run_dirs[0]), str(run_dirs[1]), "--out", str(out), "--names", "a", "b"]) == 0
    table = parse_table((out / "summary.md").read_text())
    assert {k: v[0] for k, v in table.items()} == {"a": "lr=0.001", "b": "lr=0.01"}  # differences
    assert main([str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "no such run folder" in capsys.readouterr().err


def test_labels_fall_back_to_config_differences_and_stay_unique(run_dirs) -> None:
    runs = [load_run(d) for d in run_dirs]
    assert run_labels(runs[:2]) == ["lr=0.001", "lr=0.01"]
    twins = [runs[1], Run("", dict(runs[1].config), runs[1].history, "/x/other")]
    assert run_labels(twins) == ["csv_high_lr", "other"]  # nothing differs: the folder names
    named = Run("mine", runs[0].config, runs[0].history, "/x/y")
    assert run_labels([named, runs[1]]) == ["mine", "lr=0.01"]


def test_final_loss_ignores_a_healthy_val_before_divergence() -> None:
    history = [{"step": 0, "train/loss": 6.0}, {"step": 50, "val/loss": 3.0}]
    history += [{"step": s, "train/loss": v} for s, v in [(60, 3.0), (70, 4.0), (80, math.nan)]]
    run = Run("", {}, history, "x")
    assert math.isnan(final_loss(run).value)
    assert init_loss(run).value == 6.0
    healthy = Run(
        "", {}, history[:2] + [{"step": 80, "train/loss": 2.0}, {"step": 80, "val/loss": 2.5}], "x"
    )
    assert final_loss(healthy).value == 2.5
    train_only = Run("", {}, [{"step": s, "train/loss": float(s)} for s in range(8)], "x")
    assert final_loss(train_only).value == pytest.approx((3 + 4 + 5 + 6 + 7) / 5)


def test_long_run_names_give_way_to_config_differences() -> None:
    overrides = "data.global_batch_size=16,model.d_model=128,model.qk_norm={},optim.lr=0.01"
    runs = [Run(overrides.format(qk), {"model.qk_norm": qk}, [], qk) for qk in ("full", "none")]
    assert run_labels(runs) == ["qk_norm=full", "qk_norm=none"]
    short = [Run(f"tiny-{qk}", {"model.qk_norm": qk}, [], qk) for qk in ("full", "none")]
    assert run_labels(short) == ["tiny-full", "tiny-none"]


def test_layer_figure_labels_axes_colors_layers_and_logs_what_spans_decades(run_dirs) -> None:
    runs = [load_run(d) for d in run_dirs]
    fig = layer_metrics_figure(runs, run_labels(runs))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"qk/layer*/q_rms", "qk/layer*/k_rms", "attn/layer*/max_logit"}
    assert panels["attn/layer*/max_logit"].get_ylabel() == "max attention logit"
    assert panels["qk/layer*/q_rms"].get_ylabel() == "RMS of q (after QK-norm)"
    # max logit: 1 to 1000 (and inf), a log axis; q_rms 1 to 2, linear
    assert panels["attn/layer*/max_logit"].get_yscale() == "log"
    assert panels["qk/layer*/q_rms"].get_yscale() == "linear"
    (colorbar,) = [ax for ax in fig.axes if ax.get_ylabel() == "layer"]
    assert [t.get_text() for t in colorbar.get_yticklabels()] == ["0", "1"]
    lines = panels["qk/layer*/q_rms"].get_lines()  # (run, layer): run 0 layer 0, layer 1, ...
    assert lines[0].get_color() != lines[1].get_color()  # layers differ in color
    assert lines[0].get_color() == lines[2].get_color()  # runs share it, differ in style
    assert lines[0].get_linestyle() != lines[2].get_linestyle()
    assert spans_decades([np.array([0.0, -2.0, 30.0])]) and not spans_decades([np.array([1, 9])])


def test_an_arm_of_one_lr_is_a_marker_not_a_line() -> None:
    one = Arm("one", {}, {1e-3: 3.0}, 6.0, 0.0, [])
    two = Arm("two", {}, {1e-3: 3.0, 1e-2: 2.5}, 6.0, 0.25, [])
    other = Arm("other", {}, {1e-2: 7.0}, 6.0, 0.0, [])
    ax = final_loss_vs_lr_figure([one, two, other]).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["one"].get_linestyle() == "None" and lines["other"].get_linestyle() == "None"
    assert lines["one"].get_marker() != lines["other"].get_marker()  # told apart by the marker
    assert lines["two"].get_linestyle() == "-" and list(lines["two"].get_xdata()) == [1e-3, 1e-2]
    assert list(lines["other"].get_ydata()) == [6.0]  # capped at the loss at init
