"""LR sensitivity against hand-worked numbers, NaN runs, trajectory outcomes and the diverged
rule on hand-made loss curves, and the tool end to end."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest

from olmo_mini.analysis.compare import analyze
from olmo_mini.analysis.runs import Run
from olmo_mini.analysis.sensitivity import (
    Trajectory,
    ended_diverged,
    is_diverged,
    lr_sensitivity,
    trajectory,
)
from olmo_mini.analysis.sweep import write_report
from tests.analysis.test_runs import write_csv_run

TOOL = Path(__file__).parents[2] / "tools" / "lr_sensitivity.py"
GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def test_hand_worked_seven_point_grid() -> None:
    # Loss at init 10. Capped finals: 4.0, 3.5, 3.2, 3.0 (best), 3.4, min(12, 10) = 10,
    # NaN -> 10. Sum 37.1, mean 37.1 / 7 = 5.3, minus the best 3.0: 2.3.
    finals = dict(zip(GRID, (4.0, 3.5, 3.2, 3.0, 3.4, 12.0, math.nan), strict=True))
    assert lr_sensitivity(finals, init_loss=10.0) == pytest.approx(2.3)


def test_non_finite_losses_count_as_the_loss_at_init() -> None:
    # inf and -inf as NaN: (2 + 6 + 6 + 6) / 4 - 2 = 3.
    assert lr_sensitivity({1e-3: 2.0, 1e-2: math.inf, 1e-1: -math.inf, 1.0: math.nan}, 6.0) == 3.0
    assert lr_sensitivity({1e-3: math.nan, 1e-2: math.nan}, 6.0) == 0.0  # no LR trained at all
    assert lr_sensitivity({1e-3: 2.5}, 6.0) == 0.0
    with pytest.raises(ValueError, match="at least one run"):
        lr_sensitivity({}, 6.0)
    with pytest.raises(ValueError, match="must be finite"):
        lr_sensitivity({1e-3: 2.0}, math.nan)


# Hand-made training curves of 20 steps, warmup 2, loss at init 8.0 (step 1).
STEPS = list(range(1, 21))


def curve(*segments: tuple[int, float]) -> list[float]:
    """Losses per step from (number of steps, value) segments."""
    return [value for n, value in segments for _ in range(n)]


def test_mid_run_excursion_that_recovers() -> None:
    # Steps 1-5 fall to 5; 6-13 (8 of the 18 steps after warmup) sit above 8, peak 40 at 9;
    # the decay brings it back to 4.5. Final 4.5 < 8: the final-loss rule sees nothing.
    losses = curve((1, 8.0), (4, 5.0), (3, 9.0), (1, 40.0), (4, 12.0), (7, 4.5))
    path = trajectory(STEPS, losses, init_loss=8.0, final_loss=4.5, warmup_steps=2)
    assert path == Trajectory(40.0, 9, 0, 8, 8 / 18, 6, True)
    assert is_diverged(path, 4.5, 8.0, stopped_early=False)
    assert not ended_diverged(4.5, 8.0, stopped_early=False)


def test_a_short_spike_is_not_a_divergence_and_the_threshold_is_strict() -> None:
    # One step of 18 above init (5.6% ≤ 10%): a spike; the run recovered from it.
    losses = curve((1, 8.0), (9, 5.0), (1, 30.0), (9, 4.0))
    path = trajectory(STEPS, losses, 8.0, 4.0, warmup_steps=2)
    assert (path.steps_above_init, path.first_above_init, path.recovered) == (1, 11, True)
    assert not is_diverged(path, 4.0, 8.0, False)
    # Exactly at init is not above it; warmup steps do not count (step 2 at 50 is in warmup).
    losses = curve((1, 8.0), (1, 50.0), (18, 8.0))
    path = trajectory(STEPS, losses, 8.0, 8.0, warmup_steps=2)
    assert (path.max_loss, path.max_loss_step, path.steps_above_init) == (50.0, 2, 0)
    assert not path.recovered and not is_diverged(path, 8.0, 8.0, False)


def test_a_nan_is_a_divergence_even_when_the_run_ends_well() -> None:
    losses = curve((1, 8.0), (9, 5.0), (1, math.nan), (9, 4.0))
    path = trajectory(STEPS, losses, 8.0, 4.0, warmup_steps=2)
    assert path == Trajectory(8.0, 1, 1, 1, 1 / 18, 11, True)
    assert is_diverged(path, 4.0, 8.0, False) and not ended_diverged(4.0, 8.0, False)
    nothing = trajectory([1, 2], [math.nan, math.inf], 8.0, math.nan, warmup_steps=5)
    assert (nothing.max_loss_step, nothing.non_finite_steps) == (-1, 2)
    assert math.isnan(nothing.max_loss) and math.isnan(nothing.share_above_init)


def test_a_late_drift_above_init() -> None:
    # Trains to 5, then drifts up from step 17 and ends at 9: above init on 3 of 18 steps
    # (17%), not recovered; both rules call it diverged.
    losses = curve((1, 8.0), (15, 5.0), (1, 7.5), (1, 8.5), (2, 9.0))
    path = trajectory(STEPS, losses, 8.0, 9.0, warmup_steps=2)
    assert path == Trajectory(9.0, 19, 0, 3, 3 / 18, 18, False)
    assert is_diverged(path, 9.0, 8.0, False) and ended_diverged(9.0, 8.0, False)


def history(train: list[float], val_at_end: float | None = None) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = [
        {
            "step": 10 * i,
            "train/loss": v,
            "attn/layer0/max_logit": 1.0 + i,
            "attn/layer1/max_logit": 2.0 + i,
        }
        for i, v in enumerate(train)
    ]
    if val_at_end is not None:
        rows.append({"step": rows[-1]["step"], "val/loss": val_at_end})
    return rows


def test_arms_split_on_config_differences_other_than_the_lr() -> None:
    def run(lr: float, qk: str, z: float, rows: list[dict[str, float]]) -> Run:
        config = {"optim.lr": lr, "model.qk_norm": qk, "optim.z_loss": z, "logger.name": f"r{lr}"}
        return Run("", config, rows, f"{qk}-{z}-{lr}")

    runs = [
        run(1e-3, "full", 0.0, history([8.0, 4.0], 3.0)),
        run(1e-2, "full", 0.0, history([8.0, 3.0], 2.0)),
        run(1e-3, "none", 0.0, history([8.0, 5.0], 4.0)),
        run(1e-2, "none", 0.0, history([8.0, math.nan])),
        run(1e-3, "full", 1e-4, history([8.0, 4.0], 2.5)),
    ]
    arms = {arm.label: arm for arm in analyze(runs)}
    assert list(arms) == [
        "qk_norm=full, z_loss=0",
        "qk_norm=none, z_loss=0",
        "qk_norm=full, z_loss=0.0001",
    ]
    assert arms["qk_norm=full, z_loss=0"].sensitivity == pytest.approx((3.0 + 2.0) / 2 - 2.0)
    # The NaN run: the mean of its last train losses is NaN, so it counts as 8.
    assert arms["qk_norm=none, z_loss=0"].sensitivity == pytest.approx((4.0 + 8.0) / 2 - 4.0)
    assert arms["qk_norm=none, z_loss=0"].best_lr == 1e-3
    assert arms["qk_norm=full, z_loss=0.0001"].sensitivity == 0.0
    with pytest.raises(ValueError, match="two runs at lr=0.001"):
        analyze(runs + [Run("", dict(runs[0].config), runs[0].history, "dup")])


def test_lr_sensitivity_tool_writes_figures_and_the_report(tmp_path, capsys) -> None:
    sweep = tmp_path / "multirun"
    finals = {"full": (3.0, 2.6, 2.4, 2.5), "none": (3.1, 2.8, math.nan, math.nan)}
    for qk, losses in finals.items():
        for i, (lr, loss) in enumerate(zip(GRID[1:5], losses, strict=True)):
            rows = history([6.0, 4.0, loss], None if math.isnan(loss) else loss)
            config = {"optim": {"lr": lr}, "model": {"qk_norm": qk}}
            write_csv_run(sweep / f"{qk}_{i}", config, rows)
    out = tmp_path / "out"
    assert runpy.run_path(str(TOOL))["main"]([str(sweep), "--out", str(out)]) == 0
    names = ["final_loss_vs_lr.png", "max_logit_by_layer.png", "lr_sensitivity.md"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in names]
    report = (out / "lr_sensitivity.md").read_text()
    # full: (3.0 + 2.6 + 2.4 + 2.5) / 4 - 2.4 = 0.225; none: (3.1 + 2.8 + 6 + 6) / 4 - 2.8 = 1.675
    assert "| qk_norm=full | 4 | 6.0000 | 0.01 | 2.4000 | **0.2250** |" in report
    assert "| qk_norm=none | 4 | 6.0000 | 0.003 | 2.8000 | **1.6750** |" in report
    assert "| 0.01 | nan | train/loss mean @ 0–20 | 6.0000 | 20 | 4 (1, 20) |" in report
    for name in names[:2]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_a_grid_too_small_to_rank_arms_is_a_warning(tmp_path, caplog) -> None:
    def run(lr: float, qk: str, final: float) -> Run:
        return Run("", {"optim.lr": lr, "model.qk_norm": qk}, history([8.0, final], final), qk)

    five = [run(lr, "full", loss) for lr, loss in zip(GRID[:5], (4, 3, 2, 3, 4), strict=True)]
    edge = [run(lr, "head", loss) for lr, loss in zip(GRID[:5], (6, 5, 4, 3, 2), strict=True)]
    two = [run(1e-3, "none", 3.0), run(1e-2, "none", 2.0)]
    write_report(five + edge + two, tmp_path)
    report = (tmp_path / "lr_sensitivity.md").read_text()
    assert "'qk_norm=none' has 2 learning rates" in report and "qk_norm=full" not in caplog.text
    assert f"the best LR ({GRID[4]:g}) is at the end of its grid" in report
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
