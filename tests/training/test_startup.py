"""``train.py``'s start: config errors before the heavy stack, no run dir left by bad input,
resolved saved configs that tools can read, the config schema importable without Lightning."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from types import ModuleType

import pytest
import yaml

from olmo_mini import startup
from tests.training.helpers import REPO, check, run_train, series, train_command


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_schema_imports_without_torch_or_lightning():
    result = _python(
        "import sys, olmo_mini.config, olmo_mini.model.config, olmo_mini.startup\n"
        "print(sorted(m for m in ('torch', 'lightning', 'wandb') if m in sys.modules))"
    )
    check(result)
    assert result.stdout.strip() == "[]"


def test_config_error_is_one_line_before_torch_and_leaves_no_run_dir(tmp_path):
    """train.py's main in this interpreter: it exits on the bad value with torch never imported."""
    run_dir = tmp_path / "run"
    argv = [str(REPO / "train.py"), "data.global_batch_size=30", f"hydra.run.dir={run_dir}"]
    result = _python(
        f"import runpy, sys\nsys.argv = {argv!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n    print('torch' in sys.modules, 'lightning' in sys.modules)"
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: data.global_batch_size (30) must be divisible by data.micro_batch_size (8)"
    )
    assert result.stdout.strip() == "False False"
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.max_step=5",
            "trainer.max_step: no such config key; did you mean trainer.max_steps, "
            "trainer.stop_at_step?",
        ),
        (
            "model.d_model=abc",
            "model.d_model=abc: Value 'abc' of type 'str' could not be converted to Integer",
        ),
        (
            "model=olmo2_huge",
            "In 'train': Could not find 'model/olmo2_huge'; available: olmo2_13b, olmo2_1b, "
            "olmo2_32b, olmo2_7b, olmo2_small, olmo2_tiny, wortsman",
        ),
        ("trainer.foo.bar=1", "trainer.foo: no such config key"),
        (
            "experiment=qk_lr_sweep_cpu",
            "experiment=qk_lr_sweep_cpu: experiment is not in train.yaml's defaults; add it with "
            "+experiment=qk_lr_sweep_cpu",
        ),
        (
            "optim.lr=1e-3 optim.lr=2e-3",
            "optim.lr is given twice (optim.lr=1e-3, optim.lr=2e-3): keep one",
        ),
    ],
)
def test_a_bad_override_is_one_line_naming_it(tmp_path, override, message):
    """Hydra's own composition errors (before train.py's code runs) are one line too."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", *override.split(), f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {message}"
    assert not run_dir.exists()


def test_help_lists_the_groups_train_py_takes():
    """The study plans (studies/) are tools/study.py's, not a group of train.py."""
    result = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    check(result)
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    names = [line.split(":")[0] for line in groups.splitlines()[3:] if line.strip()]
    assert names == [
        "checkpoint", "cluster", "data", "debug", "experiment", "logger", "model", "optim",
        "stability", "trainer",
    ]  # fmt: skip
    assert "+experiment=option" in groups


def test_bad_input_keeps_a_run_dir_that_holds_a_run(tmp_path):
    (tmp_path / "csv").mkdir()  # an earlier run's metrics: resuming here with a typo keeps them
    result = subprocess.run(
        train_command(tmp_path, "optim.lr=-1"),
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.strip().startswith("error: optim.lr")
    assert (tmp_path / "csv").is_dir() and (tmp_path / ".hydra").is_dir()


def test_auto_threads_leave_cores_to_other_work(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for load, processes, expected in [
        (0.2, 1, "8"),
        (3.0, 1, "5"),
        (0.0, 2, "4"),
        (20.0, 1, "1"),
        (6.0, 2, "1"),
    ]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        startup.set_cpu_threads(None, processes)
        assert os.environ.pop("OMP_NUM_THREADS") == expected, (load, processes)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins over auto ...
    startup.set_cpu_threads(None, 1)
    assert os.environ["OMP_NUM_THREADS"] == "3"
    startup.set_cpu_threads(2, 1)  # ... and trainer.cpu_threads over both
    assert os.environ["OMP_NUM_THREADS"] == "2"


def test_a_resume_keeps_the_threads_its_run_trained_with(monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))  # auto would pick 2
    with caplog.at_level(logging.INFO):
        startup.set_cpu_threads(None, 1, trained_with=4)
    assert os.environ.pop("OMP_NUM_THREADS") == "4"
    assert caplog.messages == [
        "CPU threads: 4 per process, as the run trained with (its run.json; "
        "trainer.cpu_threads=N sets another)"
    ]
    startup.set_cpu_threads(1, 1, trained_with=4)  # trainer.cpu_threads says otherwise
    assert os.environ.pop("OMP_NUM_THREADS") == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # and so does OMP_NUM_THREADS
    startup.set_cpu_threads(None, 1, trained_with=4)
    assert os.environ["OMP_NUM_THREADS"] == "3"


@pytest.mark.slow
def test_a_study_sweep_job_can_be_exported_sampled_and_evaluated(tmp_path, capsys):
    """The study experiment names wandb runs by ``${hydra:job.override_dirname}``: its saved
    config must be resolved for the tools, which run outside Hydra."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "+experiment=qk_lr_sweep_cpu",
            "debug=smoke",  # the experiment's own shapes and logger come after it
            "logger=none",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "checkpoint.save_final=true",
            "hydra.sweeper.params={optim.lr:1e-3,model.qk_norm:full}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    check(result)
    job = sweep / "0"
    saved = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    assert "model.qk_norm=full" in saved["logger"]["name"] and "${" not in json.dumps(saved)
    assert "step 2/2 | loss" in result.stdout  # the study shows progress (no bar there)
    assert _tool("convert_hf").main(["to-hf", str(job), str(tmp_path / "hf")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask, modes
    assert _tool("generate").main([str(job), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert _tool("evaluate").main([str(job)]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["loss"] == pytest.approx(series(job, "val/loss")[2], rel=1e-5)


@pytest.mark.slow
def test_console_tells_the_runs_story_in_plain_lines(tmp_path):
    """Piped stdout: no carriage-return frames, progress in optimizer steps, the same story in
    train.log, none of the known third-party warnings."""
    result = run_train(
        tmp_path,
        "debug=smoke",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "logger=wandb",
        "checkpoint.every_n_steps=2",
        "trainer.progress_bar=true",
    )
    check(result)
    out = result.stdout
    assert "\r" not in out and "step 4/4 | loss" in out and "final val/loss" in out
    assert "\nmodel: 0.6M parameters (0.1M non-embedding) | 8 × 64 = 512 tokens/step" in "\n" + out
    noise = ("wandb:", "anonymous", "litlogger", "LeafSpec", "weights_only", "GPU available")
    assert not [n for n in noise if n in out + result.stderr], out + result.stderr
    log = (tmp_path / "train.log").read_text()
    assert "step 4/4 | loss" in log and "final val/loss" in log


def test_a_glob_that_matches_nothing_is_one_line_naming_it(tmp_path):
    result = subprocess.run(
        train_command(tmp_path / "run", "data=files", f"data.files=[{tmp_path}/corpus/*.txt]"),
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: data.files: no file matches '{tmp_path}/corpus/*.txt'"
    assert not (tmp_path / "run").exists()
