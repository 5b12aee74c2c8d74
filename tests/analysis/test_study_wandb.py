"""The study in wandb, read back from the files wandb wrote offline: every run named
``<plan>/<arm>/lr<LR>/s<seed>``, grouped by its plan and tagged with its arm, and one summary run
per plan whose tables hold one row per run and per arm and whose images are the report's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from olmo_mini.analysis.runs import read_wandb_records
from olmo_mini.analysis.study import FIELDS, PLAN_DIR, load_plan
from olmo_mini.analysis.study_wandb import ARM_COLUMNS, run_logger
from olmo_mini.config import LoggerConfig
from tests.interop.helpers import tool


def test_a_study_run_is_named_grouped_and_tagged_by_its_plan_and_arm() -> None:
    plan = load_plan("A")
    clip = next(s for s in plan.runs() if s.arm == "none + QK-Clip 100" and s.lr == 1e-3)
    logger = run_logger(LoggerConfig(), plan, clip)
    assert (logger.kind, logger.name, logger.group) == (
        "wandb",
        "A/none + QK-Clip 100/lr0.001/s0",
        "A",
    )
    # The arm, then the settings its own overrides change; the base (every run's) makes none.
    assert logger.tags == [
        "none + QK-Clip 100",
        "qk_norm=none",
        "qk_clip_tau=100",
        "lr=0.001",
        "seed=0",
    ]
    full = next(s for s in plan.runs() if s.arm == "qk_norm=full (OLMo 2)")
    assert run_logger(LoggerConfig(tags=["mine"]), plan, full).tags == [
        "mine",
        "qk_norm=full (OLMo 2)",
        "lr=0.001",
        "seed=0",
    ]


def two_run_plan(folder: Path) -> Path:
    """The tiny plan cut to one LR (two runs, one per arm) of two steps each."""
    plan = yaml.safe_load((PLAN_DIR / "tiny.yaml").read_text())
    shorter = {"trainer.max_steps": "2", "trainer.val_check_interval": "2"}
    plan["base"] = [
        f"{key}={shorter[key]}" if key in shorter else override
        for override in plan["base"]
        for key in [override.split("=", 1)[0]]
    ]
    plan["lrs"] = [1e-3]
    path = folder / "two.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def read_launch(folder: Path) -> dict:
    """The one offline wandb launch in ``folder``: its run record's labels and exit code."""
    (launch,) = folder.glob("wandb/offline-run-*")
    (wandb_file,) = launch.glob("run-*.wandb")
    records, note = read_wandb_records(wandb_file)
    assert note is None, note
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    (exit_code,) = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    return {
        "folder": launch,
        "name": run.display_name,
        "group": run.run_group,
        "job_type": run.job_type,
        "tags": list(run.tags),
        "exit_code": exit_code,
    }


def test_a_study_with_wandb_logs_labelled_runs_and_a_summary_run(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["--plan", str(two_run_plan(tmp_path)), "--out", str(out), "--wandb", "--threads", "1"]
    assert tool("study").main(argv) == 0
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    assert sorted(r["arm"] for r in rows) == ["qk_norm=full", "qk_norm=none"]
    for row in rows:
        launch = read_launch(out / row["run_id"])
        assert launch["name"] == f"two/{row['arm']}/lr0.001/s0"
        assert launch["group"] == "two" and launch["exit_code"] == 0
        assert launch["tags"] == [row["arm"], "lr=0.001", "seed=0"]  # the arm's tag once
        assert row["steps"] == 2

    summary = read_launch(out / "summary")
    assert (summary["name"], summary["group"], summary["job_type"]) == (
        "two/summary",
        "two",
        "summary",
    )
    assert summary["tags"] == ["summary"] and summary["exit_code"] == 0
    assert str(summary["folder"]) in capsys.readouterr().out.splitlines()
    media = summary["folder"] / "files" / "media"
    (runs_file,) = media.glob("table/study/runs_*.table.json")
    runs = json.loads(runs_file.read_text())
    assert runs["columns"] == list(FIELDS)
    assert sorted(r[FIELDS.index("run_id")] for r in runs["data"]) == sorted(
        r["run_id"] for r in rows
    )
    finals = {r[FIELDS.index("run_id")]: r[FIELDS.index("final_loss")] for r in runs["data"]}
    assert finals == {r["run_id"]: pytest.approx(r["final_loss"]) for r in rows}
    (arms_file,) = media.glob("table/study/arms_*.table.json")
    arms = json.loads(arms_file.read_text())
    assert arms["columns"] == list(ARM_COLUMNS)
    assert sorted(a[0] for a in arms["data"]) == ["qk_norm=full", "qk_norm=none"]
    images = sorted(p.name.split("_0_")[0] for p in media.glob("images/figures/*.png"))
    assert images == ["final_loss_vs_lr", "logits_mean_logsumexp"]

    # Again with everything done: no run trains, the summary run continues under its id.
    assert tool("study").main([*argv, "--render-only"]) == 0
    launches = sorted((out / "summary" / "wandb").glob("offline-run-*"))
    assert len(launches) == 2 and len({p.name.rsplit("-", 1)[1] for p in launches}) == 1
