"""Bad input is one ``error:`` line naming the file or setting as the user wrote it, exit status
1, nothing written (issue 25, item 7): a read-only run dir, study plans, ``plan_memory.py``
overrides, ``compare_runs.py`` inputs. Damaged shards: tests/data/test_damaged_shards.py; model
sources: tests/interop/test_tool_errors.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from olmo_mini.bench.trace import main as plan_main
from tests.interop.helpers import tool
from tests.training.helpers import REPO, train_command


def test_a_read_only_run_dir_is_one_line(tmp_path):
    run_dir = tmp_path / "ro" / "run"
    run_dir.mkdir(parents=True)
    mount = f"mount --bind {run_dir.parent} {run_dir.parent} && mount -o remount,ro,bind "
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"{mount}{run_dir.parent}"])
    if probe.returncode != 0:
        pytest.skip("no mount namespace here to make a read-only dir (root ignores permissions)")
    command = " ".join(f"'{a}'" for a in train_command(run_dir, "debug=smoke"))
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{mount}{run_dir.parent} && cd {REPO} && {command}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr == (
        f"error: hydra.run.dir={run_dir}: cannot take run.lock: Read-only file system\n"
    )


def _plan(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "plan.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def test_study_plans_are_checked_before_the_first_run(tmp_path, capsys):
    plan = _plan(
        tmp_path,
        "base: [debug=smoke]\narms:\n  good: []\n  typo: [optim.warmup_step=3]\nlrs: [0.001]\n",
    )
    out = tmp_path / "out"
    assert tool("study").main(["--plan", str(plan), "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        "error: plan 'plan', arm typo: optim.warmup_step: no such config key; did you mean "
        "optim.warmup_steps?\n"
    )
    assert not out.exists()  # the good arm did not train first


@pytest.mark.parametrize(
    "plan_text, out_is_file, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff", False, "{plan}: not valid YAML: 'utf-8' codec can't"),
        ("base: [debug=smoke\narms: {a: []}\n", False, "{plan}: not valid YAML: while parsing"),
        ("arms: {a: []}\nlrs: [0.001]\n", True, "--out {out}: {out} is a file, not a folder"),
    ],
)
def test_bad_study_files_are_one_line(tmp_path, capsys, plan_text, out_is_file, message):
    plan, out = _plan(tmp_path, plan_text), tmp_path / "out"
    if out_is_file:
        out.write_text("not a folder")
    assert tool("study").main(["--plan", str(plan), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(plan=plan, out=out)), err
    assert err.count("\n") == 1


def test_plan_memory_names_an_unknown_key_with_its_close_match():
    with pytest.raises(SystemExit) as stopped:
        plan_main(["trainer.max_step=3"])
    assert stopped.value.code == (
        "error: trainer.max_step: no such config key; did you mean trainer.max_steps, "
        "trainer.stop_at_step?"
    )


def test_compare_runs_names_an_undecodable_metrics_file_and_an_out_that_is_a_file(tmp_path, capsys):
    metrics = tmp_path / "run" / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_bytes(b"step,train/loss\n1,\xff\xfe\n")
    out = tmp_path / "out"
    assert tool("compare_runs").main([str(tmp_path / "run"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {metrics}: not a readable metrics CSV file (") and not out.exists()
    )
    assert err.count("\n") == 1
    out.write_text("not a folder")
    assert tool("compare_runs").main([str(tmp_path / "run"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: --out {out}: {out} is a file, not a folder\n"
