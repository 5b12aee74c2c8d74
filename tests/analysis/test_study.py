"""The study runner: hand-worked LR sensitivity and divergence, the report on fixed rows, plan
errors, the tiny plan end to end, and a killed study that continues without redoing runs."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from olmo_mini.analysis.compare import plot_final_loss_vs_lr
from olmo_mini.analysis.sensitivity import (
    DIVERGED_SHARE_ABOVE_INIT,
    ended_diverged,
    is_diverged,
    trajectory,
)
from olmo_mini.analysis.study import (
    FIELDS,
    RESULT_FILE,
    TRAJECTORY_FIELDS,
    StudyError,
    arm_results,
    load_plan,
    plot_final_loss_by_size,
    plot_sensitivity_vs_size,
    pooled_std,
    read_result,
    read_rows,
    report_markdown,
    run_plan,
    seed_spread,
    sensitivity_noise,
    size_points,
    write_rows,
)

ROOT = Path(__file__).parents[2]
TOOL = ROOT / "tools" / "study.py"


def row(
    arm: str,
    lr: float,
    final: float,
    *,
    seed: int = 0,
    init: float = 8.0,
    stopped: bool = False,
    logit: float = 10.0,
    entropy: float = 1.0,
    losses: tuple[float, ...] = (),
    size: str = "",
    params: int | None = None,
) -> dict:
    """A summary row; ``losses``: the training losses of steps 2, 3, ... after ``init`` at
    step 1 (warmup 1), else a run that falls straight to its final loss; ``size`` and
    ``params``: a plan with sizes' (``arm`` then names the arm without its size)."""
    path = trajectory(range(1, 3 + len(losses)), (init, *losses, final), init, final, 1)
    values = {key: math.nan for key in FIELDS}
    values.update(
        plan="fixed",
        arm=f"{size}, {arm}" if size else arm,
        lr=lr,
        seed=seed,
        size=size,
        non_embedding_params=params,
        run_id=f"{size}{arm}-{lr:g}-{seed}",
        steps=100,
        max_steps=100,
        init_loss=init,
        final_loss=final,
        final_from="val/loss @ 100",
        stopped_early=stopped,
        diverged=is_diverged(path, final, init, stopped),
        diverged_by_final=ended_diverged(final, init, stopped),
        max_train_loss=path.max_loss,
        max_train_loss_step=path.max_loss_step,
        non_finite_steps=path.non_finite_steps,
        steps_above_init=path.steps_above_init,
        share_above_init=path.share_above_init,
        first_above_init=path.first_above_init,
        recovered=path.recovered,
        peak_attn_logit=logit,
        peak_attn_logit_layer=0,
        peak_attn_logit_step=10,
        min_attn_entropy=entropy,
        peak_abs_logsumexp=3.0,
        final_logsumexp=-2.0,
        spike_score_loss=0.0,
        spike_score_grad=1.5,
        cpu_s=30.0,
        wall_s=60.0,
        load_avg_1m=4.0,
        overrides=f"model.qk_norm={arm}",
    )
    return values


# Arm "none": init 8; finals 6.0, 5.0 (best), 9.0 (above init: diverged, capped at 8), NaN
# (diverged, counts 8). Mean of capped (6 + 5 + 8 + 8) / 4 = 6.75, minus 5: 1.75.
# Arm "full": 5.5, 4.5, 4.0 (best), 4.2: mean 4.55 - 4.0 = 0.55.
FIXED = [
    row("none", lr, f, logit=lg)
    for lr, f, lg in (
        (1e-3, 6.0, 30.0),
        (1e-2, 5.0, 900.0),
        (1e-1, 9.0, 2.5e4),
        (1.0, math.nan, math.nan),
    )
]
FIXED += [
    row("full", lr, f, entropy=e)
    for lr, f, e in ((1e-3, 5.5, 2.0), (1e-2, 4.5, 1.2), (1e-1, 4.0, 0.7), (1.0, 4.2, 0.9))
]


def test_divergence_classification_hand_worked() -> None:
    assert ended_diverged(math.nan, 8.0, False)
    assert ended_diverged(math.inf, 8.0, False)
    assert ended_diverged(8.01, 8.0, False)  # ended above the loss at init
    assert ended_diverged(5.0, 8.0, True)  # stopped on non-finite steps
    assert not ended_diverged(8.0, 8.0, False)
    assert not ended_diverged(7.9, 8.0, False)


def test_arm_results_hand_worked_and_ranked_by_sensitivity() -> None:
    full, none = arm_results(FIXED)
    assert (full.arm, none.arm) == ("full", "none")
    assert full.sensitivity == pytest.approx(0.55)
    assert none.sensitivity == pytest.approx(1.75)
    assert (full.best_lr, full.best_loss) == (1e-1, 4.0)
    assert (none.best_lr, none.best_loss) == (1e-2, 5.0)
    assert none.diverged_lrs == [1e-1, 1.0] and full.diverged_lrs == []
    assert none.peak_attn_logit == 2.5e4  # the NaN run's logit is skipped
    assert full.min_attn_entropy == 0.7
    with pytest.raises(StudyError, match="two runs at one LR"):
        arm_results(FIXED + [row("full", 1e-3, 5.0)])


def test_seed_spread_is_the_sample_std_per_grid_point() -> None:
    rows = [row("full", 0.1, v, seed=s) for s, v in enumerate((4.0, 4.2, 4.4))]
    assert seed_spread(rows + [row("none", 0.1, 5.0)]) == [
        ("full", 0.1, 3, pytest.approx(4.2), pytest.approx(0.2))
    ]


def test_pooled_std_and_sensitivity_noise() -> None:
    rows = [row("full", 0.1, v, seed=s) for s, v in enumerate((4.0, 4.2, 4.4))]
    rows += [row("none", 0.1, v, seed=s) for s, v in enumerate((5.0, 5.4, 5.8))]
    assert pooled_std(rows) == pytest.approx(math.sqrt((0.2**2 + 0.4**2) / 2))
    assert math.isnan(pooled_std(FIXED))
    # Two LRs far apart: sensitivity = (b - a) / 2 exactly, whose std is sigma / sqrt(2).
    assert sensitivity_noise({0.1: 3.0, 1.0: 5.0}, 8.0, 0.0) == 0.0
    noise = sensitivity_noise({0.1: 3.0, 1.0: 5.0}, 8.0, 0.1, draws=20000)
    assert noise == pytest.approx(0.1 / math.sqrt(2), rel=0.03)
    assert sensitivity_noise({0.1: 3.0}, 8.0, 0.1) == 0.0  # one LR: always 0


def test_report_renders_fixed_rows(tmp_path) -> None:
    md = report_markdown("fixed", "Two arms.", FIXED, ["final_loss_vs_lr.png"])
    table = [
        line
        for line in md.splitlines()
        if line.startswith("| full |") or line.startswith("| none |")
    ]
    assert table[0].startswith("| full | 4 | 8.000 | 0.1 | 4 | **0.550** | 10 | 0.7 |")
    assert table[1].startswith("| none | 4 | 8.000 | 0.01 | 5 | **1.750** | 2.5e+04 | 1 |")
    assert table[1].endswith("| 0.1, 1 |") and table[0].endswith("| none |")
    assert "| none | 6 | 5 | 9 ✗ | — ✗ |" in md
    assert "8 runs, 4.0 min CPU (user + sys), 8.0 min wall" in md
    assert "![final_loss_vs_lr](final_loss_vs_lr.png)" in md
    path = write_rows(FIXED, tmp_path / "summary.csv")
    back = read_rows(path)
    assert [r["run_id"] for r in back] == [r["run_id"] for r in FIXED]
    assert report_markdown("fixed", "Two arms.", back) == report_markdown(
        "fixed", "Two arms.", FIXED
    )
    assert plot_final_loss_vs_lr(arm_results(back), tmp_path / "loss.png").stat().st_size > 10_000
    with_noise = report_markdown("fixed", "", FIXED, sigma=0.1)
    assert "seed noise of 0.100 nats" in with_noise
    assert "| **0.550** ± 0.0" in with_noise


def test_report_judges_the_trajectory_beside_the_final_loss(tmp_path) -> None:
    # "none" at LR 1: above init 8 on steps 3-6 (4 of the 6 steps after warmup, peak 50 at 4),
    # then back to 6.0: diverged by the trajectory, not by the final loss.
    rows = [row("full", lr, f) for lr, f in ((0.1, 4.0), (1.0, 4.5))]
    rows += [row("none", 0.1, 5.0), row("none", 1.0, 6.0, losses=(7.0, 9.0, 50.0, 20.0, 9.0))]
    md = report_markdown("traj", "", rows)
    assert "| none | 2 | 8.000 | 0.1 | 5 | **0.500** |" in md
    assert "| 67% | 1 | none |" in md  # max share, diverged at LR, by the final-loss rule
    assert "| full | 2 | 8.000 | 0.1 | 4 | **0.250** |" in md and "| 0% | none | none |" in md
    assert "| none | 1 | 0 | 8.000 | 50 (4) | 4 (67%) | 3 | 0 | 6 | yes | yes | no |" in md
    assert "| none | 5 | 6 ✗ |" in md
    back = read_rows(write_rows(rows, tmp_path / "summary.csv"))
    assert report_markdown("traj", "", back) == md
    # A CSV from before the trajectory columns (its diverged was the final-loss rule's): they
    # read as None.
    legacy = tmp_path / "legacy.csv"
    newer = (*TRAJECTORY_FIELDS, "diverged_by_final", "size", "non_embedding_params")
    columns = [k for k in FIELDS if k not in newer]
    with legacy.open("w") as f:
        f.write(",".join(columns) + "\n")
        for r in rows:
            r = {**r, "diverged": r["diverged_by_final"]}
            f.write(",".join(str(r[k]) for k in columns) + "\n")
    old = read_rows(legacy)
    assert old[3]["max_train_loss"] is None and old[3]["diverged_by_final"] is False
    assert (old[3]["size"], old[3]["non_embedding_params"]) == ("", None)
    assert [r["final_loss"] for r in old] == [r["final_loss"] for r in rows]
    assert "No trajectory columns in these rows" in report_markdown("old", "", old)
    assert "| — | — (no trajectory) | none |" in report_markdown("old", "", old)


# Two sizes x two arms x LRs 0.1 and 1 x seeds 0 and 1, init 8: (final at 0.1, final at 1).
# Sensitivity = mean of the two capped finals - the smaller: small "none" (5, 7) -> 1.0 and
# (5, 6) -> 0.5, mean 0.75, std 0.5/sqrt(2); big "none" (4, 9 capped at 8) and (4, 8) -> 2.0
# twice, std 0; small "ln" 0.1 and 0.2; big "ln" 0.2 and 0.1 (mean 0.15, std 0.1/sqrt(2)).
SIZED_FINALS = {
    ("small", "none"): ((5.0, 7.0), (5.0, 6.0)),
    ("big", "none"): ((4.0, 9.0), (4.0, 8.0)),
    ("small", "ln"): ((5.0, 5.2), (5.0, 5.4)),
    ("big", "ln"): ((4.0, 4.4), (4.0, 4.2)),
}
SIZED = [
    row(arm, lr, final, seed=seed, size=size, params={"small": 1000, "big": 8000}[size])
    for (size, arm), by_seed in SIZED_FINALS.items()
    for seed, finals in enumerate(by_seed)
    for lr, final in zip((0.1, 1.0), finals, strict=True)
]


def test_a_plan_with_sizes_runs_every_arm_at_every_size(tmp_path) -> None:
    path = tmp_path / "sized.yaml"
    path.write_text(
        "base: [trainer.max_steps=2]\narms: {none: [model.qk_norm=none], ln: []}\n"
        "sizes: {small: [model.d_model=64], big: [model.d_model=128]}\n"
        "lrs: [0.1, 1.0]\nseeds: [0, 1]\n"
    )
    runs = load_plan(path).runs()
    assert len(runs) == 16
    assert [(r.size, r.arm, r.lr, r.seed) for r in runs[:3]] == [
        ("small", "none", 0.1, 0),
        ("small", "none", 0.1, 1),
        ("small", "none", 1.0, 0),
    ]
    assert runs[4].overrides == (
        "trainer.max_steps=2",
        "model.d_model=64",
        "optim.lr=0.1",
        "seed=0",
    )
    assert (runs[4].label, runs[-1].label) == ("small, ln", "big, ln")
    assert runs[4].run_id.startswith("small_ln-lr0.1-s0-")
    assert len({r.run_id for r in runs}) == 16
    plain = load_plan("tiny").runs()[0]  # no sizes: named by the arm alone, as before
    assert plain.label == plain.arm and plain.size == ""


def test_sensitivity_against_size_hand_worked(tmp_path) -> None:
    points = size_points(SIZED)
    assert [(p.arm, p.size, p.non_embedding_params) for p in points] == [
        ("ln", "small", 1000),
        ("ln", "big", 8000),
        ("none", "small", 1000),
        ("none", "big", 8000),
    ]
    expected = {
        ("ln", "small"): ((0.1, 0.2), 0.15, 0.1 / math.sqrt(2)),
        ("ln", "big"): ((0.2, 0.1), 0.15, 0.1 / math.sqrt(2)),
        ("none", "small"): ((1.0, 0.5), 0.75, 0.5 / math.sqrt(2)),
        ("none", "big"): ((2.0, 2.0), 2.0, 0.0),
    }
    for p in points:
        per_seed, mean, std = expected[(p.arm, p.size)]
        assert [p.sensitivities[s] for s in (0, 1)] == pytest.approx(per_seed)
        assert (p.mean, p.std) == (pytest.approx(mean), pytest.approx(std, abs=1e-12))
    assert [p.diverged_runs for p in points] == [0, 0, 0, 1]  # the 9.0 ended above init
    md = report_markdown("sized", "", SIZED)
    assert "| none | small | 1,000 | 1.000, 0.500 | **0.750 ± 0.35** | 0 of 4 |" in md
    assert "| none | big | 8,000 | 2.000, 2.000 | **2.000 ± 0** | 1 of 4 |" in md
    back = read_rows(write_rows(SIZED, tmp_path / "summary.csv"))
    assert size_points(back) == points
    figure = plot_sensitivity_vs_size(points, tmp_path / "size.png")
    assert figure.stat().st_size > 10_000
    assert plot_final_loss_by_size(SIZED, tmp_path / "by_size.png").stat().st_size > 10_000
    assert size_points(FIXED) == []  # a plan without sizes has no such table
    assert "LR sensitivity against model size" not in report_markdown("fixed", "", FIXED)
    mixed = [*SIZED[:-1], {**SIZED[-1], "non_embedding_params": 9000}]
    with pytest.raises(StudyError, match="arm 'big, ln': runs of \\[8000, 9000\\] parameters"):
        size_points(mixed)


def test_plan_errors_name_the_file_and_field(tmp_path) -> None:
    with pytest.raises(StudyError, match="no file .*nosuch.yaml.*tiny"):
        load_plan("nosuch")
    cases = {
        "arms: {a: []}\nlrs: [0.1]\nextra: 1\n": "unknown fields \\['extra'\\]",
        "arms: {a: [optim.lr=0.1]}\nlrs: [0.1]\n": "arms.a sets 'optim.lr=0.1'",
        "arms: {a: []}\nlrs: [0.1, 0.1]\n": "lrs must hold distinct numbers",
        "arms: {a: []}\nlrs: []\n": "lrs must be a non-empty list",
        "arms: {a: model.qk_norm=none}\nlrs: [0.1]\n": "arms.a must be a list of strings",
        "arms: {a: []}\nlrs: [0.1]\nsizes: {}\n": "sizes must be a non-empty mapping",
        "arms: {a: []}\nlrs: [0.1]\nsizes: {s: [seed=1]}\n": "sizes.s sets 'seed=1'",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"plan{i}.yaml"
        path.write_text(text)
        with pytest.raises(StudyError, match=f"{path}: {message}"):
            load_plan(path)


@pytest.mark.slow
def test_tiny_plan_end_to_end_then_skips_completed_runs(tmp_path) -> None:
    plan = load_plan("tiny")
    first = plan.runs()[0].run_id
    lock = tmp_path / f"{first}.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))  # held
    rows, ran = run_plan(plan, tmp_path)
    assert ran == 3 and first not in {r["run_id"] for r in rows}
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))  # stale
    rows, ran = run_plan(plan, tmp_path)
    assert ran == 1 and len(rows) == 4 and not lock.exists()
    for r in rows:
        assert r["steps"] == r["max_steps"] == 4 and r["final_from"] == "val/loss @ 4"
        assert math.isfinite(r["final_loss"]) and math.isfinite(r["peak_attn_logit"])
        assert r["cpu_s"] > 0 and math.isfinite(r["peak_abs_logsumexp"])
        # From train/ce_loss (step 1's is the loss at init); 4 steps barely train, so a step
        # after warmup may sit above init by batch noise, and the trajectory rule counts it.
        assert r["max_train_loss"] >= r["init_loss"] and 1 <= r["max_train_loss_step"] <= 4
        assert r["non_finite_steps"] == 0 and r["diverged_by_final"] is (
            r["final_loss"] > r["init_loss"]
        )
        assert r["share_above_init"] == r["steps_above_init"] / 3
        assert r["diverged"] is (r["share_above_init"] > DIVERGED_SHARE_ABOVE_INIT)
    assert len({r["run_id"] for r in rows}) == 4
    assert {(r["arm"], r["lr"]) for r in rows if r["diverged"]} == {  # none by batch noise
        ("qk_norm=full", 0.3),
        ("qk_norm=none", 0.3),
    }
    again, ran = run_plan(plan, tmp_path)
    assert ran == 0 and again == rows


@pytest.mark.slow
def test_killed_study_continues_without_redoing_completed_runs(tmp_path) -> None:
    out = tmp_path / "study"
    cmd = [sys.executable, str(TOOL), "--plan", "tiny", "--out", str(out), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not list(out.glob(f"*/{RESULT_FILE}")):
        assert proc.poll() is None and time.monotonic() < deadline, "no run completed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.read_bytes() for p in out.glob(f"*/{RESULT_FILE}")}
    assert 1 <= len(done) < 4

    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"plan tiny: 4 of 4 runs complete, {4 - len(done)} trained now" in result.stdout
    for run_id, content in done.items():  # completed runs untouched
        assert (out / run_id / RESULT_FILE).read_bytes() == content
    for run_dir in (p.parent for p in out.glob(f"*/{RESULT_FILE}")):  # one launch each
        assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
    assert read_rows(out / "report" / "summary.csv")[0]["run_id"] in done


def test_a_result_json_from_before_the_trajectory_columns_still_renders(tmp_path) -> None:
    """``--render-only`` over runs that finished before the trajectory columns: their
    ``diverged`` was the final-loss rule's, and the trajectory columns read as None."""
    old = {k: v for k, v in row("none", 1.0, 6.0).items() if k not in TRAJECTORY_FIELDS}
    old["diverged"] = old.pop("diverged_by_final")
    (tmp_path / RESULT_FILE).write_text(json.dumps(old))
    back = read_result(tmp_path)
    assert back["diverged_by_final"] is False and back["max_train_loss"] is None
    assert read_rows(write_rows([back], tmp_path / "summary.csv"))[0]["final_loss"] == 6.0
