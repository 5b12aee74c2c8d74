"""The study in wandb, read back from the files wandb wrote offline: every run named
``<plan>/<arm>/lr<LR>/s<seed>``, grouped by its plan and tagged with its arm, and one summary run
per plan whose tables hold one row per run and per arm and whose images are the report's."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from olmo_mini.analysis.runs import read_wandb_records
from olmo_mini.analysis.study import FIELDS, PLAN_DIR, StudyError, load_plan, render
from olmo_mini.analysis.study_wandb import ARM_COLUMNS, log_summary, run_labels
from olmo_mini.config import LoggerConfig
from olmo_mini.run_dir import LOCK_FILE
from tests.analysis.test_study import FIXED
from tests.interop.helpers import tool


def test_a_study_run_is_named_grouped_and_tagged_by_its_plan_and_arm() -> None:
    plan = load_plan("A")
    clip = next(s for s in plan.runs() if s.arm == "none + QK-Clip 100" and s.lr == 1e-3)
    logger = run_labels(plan)(clip, LoggerConfig())
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
    assert run_labels(plan)(full, LoggerConfig(tags=["mine"])).tags == [
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
    """The latest offline wandb launch in ``folder``: its run record's labels, history steps
    and exit code."""
    launch = sorted(folder.glob("wandb/offline-run-*"))[-1]  # the latest
    (wandb_file,) = launch.glob("run-*.wandb")
    records, note = read_wandb_records(wandb_file)
    assert note is None, note
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    (exit_code,) = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    history = [r.history.item for r in records if r.WhichOneof("record_type") == "history"]
    return {
        "folder": launch,
        "name": run.display_name,
        "group": run.run_group,
        "job_type": run.job_type,
        "tags": list(run.tags),
        "exit_code": exit_code,
        "steps": [
            int(i.value_json)
            for items in history
            for i in items
            if "_step" in (i.key, *i.nested_key)
        ],
    }


def summary_contents(folder: Path) -> tuple[dict, dict, list[str]]:
    """The summary run's runs table, arms table (as wandb wrote them) and figure names."""
    media = folder / "files" / "media"
    (runs_file,) = media.glob("table/study/runs_*.table.json")
    (arms_file,) = media.glob("table/study/arms_*.table.json")
    images = sorted(p.name.split("_0_")[0] for p in media.glob("images/figures/*.png"))
    return json.loads(runs_file.read_text()), json.loads(arms_file.read_text()), images


def test_the_summary_run_carries_the_reports_tables_and_figures(tmp_path) -> None:
    plan = replace(load_plan("tiny"), name="fixed")
    report = render(plan, FIXED, tmp_path / "report")
    folder = log_summary(plan, FIXED, report, tmp_path)
    summary = read_launch(tmp_path / "summary")
    assert summary["folder"] == folder and summary["exit_code"] == 0
    assert (summary["name"], summary["group"], summary["job_type"]) == (
        "fixed/summary",
        "fixed",
        "summary",
    )
    assert summary["tags"] == ["summary"] and summary["steps"] == [0]
    runs, arms, images = summary_contents(folder)
    assert runs["columns"] == list(FIELDS)
    # The rows as summary.csv holds them, NaN (a diverged run's loss) included.
    assert json.dumps(runs["data"]) == json.dumps([[row[k] for k in FIELDS] for row in FIXED])
    assert arms["columns"] == list(ARM_COLUMNS)
    assert arms["data"] == [
        ["full", 0, 4, 8.0, 0.1, 4.0, pytest.approx(0.55), "none"],
        ["none", 0, 4, 8.0, 0.01, 5.0, pytest.approx(1.75), "0.1, 1"],
    ]
    assert images == ["final_loss_vs_lr"]


@pytest.mark.slow
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
    assert (summary["name"], summary["group"]) == ("two/summary", "two")
    assert str(summary["folder"]) in capsys.readouterr().out.splitlines()
    runs, arms, images = summary_contents(summary["folder"])
    run_ids = [r[FIELDS.index("run_id")] for r in runs["data"]]
    assert sorted(run_ids) == sorted(r["run_id"] for r in rows)  # one row per run
    assert len(arms["data"]) == 2
    assert images == ["final_loss_vs_lr", "logits_mean_logsumexp"]

    # Again with everything done: nothing trains, the summary run continues under its id.
    assert tool("study").main([*argv, "--render-only"]) == 0
    launches = sorted((out / "summary" / "wandb").glob("offline-run-*"))
    assert len(launches) == 2 and len({p.name.rsplit("-", 1)[1] for p in launches}) == 1
    assert read_launch(out / "summary")["steps"] == [1]  # after the first render's step 0


def test_a_summary_run_another_process_is_logging_is_a_study_error(tmp_path) -> None:
    lock = tmp_path / "summary" / LOCK_FILE
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))  # live
    with pytest.raises(StudyError, match="plan 'tiny': its summary run: .* in use by another"):
        log_summary(load_plan("tiny"), FIXED, [], tmp_path)
    assert not (tmp_path / "summary" / "wandb").exists() and lock.exists()
