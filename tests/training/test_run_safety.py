"""Runs that cannot lose or mix work (issue 17): one run per dir, verified checkpoints with
fallback, architecture check on resume, signals that save and stop, no diverged checkpoints,
failed saves that clean up, strict config keys."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from olmo_mini.config import ConfigError
from olmo_mini.data.config import DataError
from olmo_mini.interop import run_config
from olmo_mini.run_dir import LOCK_FILE, lock, read_run_id, release, resume_command
from olmo_mini.training import TrainingDiverged, interrupt, train
from olmo_mini.training.checkpoint import (
    COMPLETE,
    STATE_FILE,
    CheckpointError,
    resolve_resume,
    verify,
)
from olmo_mini.training.interrupt import Interrupted, StopOnSignal
from tests.training.helpers import (
    CHECKPOINTS,
    REPO,
    check,
    compose_config,
    overridden,
    run_train,
    series,
    train_command,
)
from tests.training.test_train import PoisonGradients

COMMON = ["debug=smoke", *CHECKPOINTS, "trainer.val_check_interval=100", "stability=off"]
# The schedule spans 1000 steps, so that stopping early changes nothing.
LONG = [*COMMON, "trainer.max_steps=1000"]


def _config(*overrides: str):
    return compose_config(*COMMON, *overrides)


def _steps(run_dir: Path) -> list[str]:
    names = [p.name for p in (run_dir / "checkpoints").glob("step_*")]
    return sorted(names, key=lambda name: int(name.removeprefix("step_")))


def test_fresh_run_refuses_a_dir_holding_another_runs_checkpoints(tmp_path):
    train(
        _config("trainer.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=10"),
        tmp_path,
    )
    other = (
        "trainer.max_steps=3",
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=2",
        "seed=1",
    )
    with pytest.raises(
        ConfigError,
        match="holds another run's checkpoints \\(step_2, step_4\\); "
        "continue that run with resume=auto, or .* another hydra.run.dir",
    ):
        train(_config(*other), tmp_path)
    assert _steps(tmp_path) == ["step_2", "step_4"]
    train(_config(*other, "checkpoint.overwrite=true"), tmp_path)
    assert _steps(tmp_path) == ["step_2", "step_3"]
    assert run_config(tmp_path / "checkpoints" / "step_3").seed == 1


def test_a_second_live_job_stops_before_writing_and_a_stale_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        lock = tmp_path / LOCK_FILE
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        config = _config("trainer.max_steps=2", "checkpoint.every_n_steps=2")
        with pytest.raises(ConfigError, match=f"in use by another job \\(pid {holder.pid} on "):
            train(config, tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    train(config, tmp_path)  # the holder is gone: its lock is stale
    assert _steps(tmp_path) == ["step_2"] and not lock.exists()


@pytest.mark.slow
def test_two_launches_into_one_dir_at_once_leave_one_run(tmp_path):
    launches = [
        subprocess.Popen(
            train_command(
                tmp_path,
                *overridden(COMMON, "checkpoint.every_n_steps=1"),
                "trainer.max_steps=3",
                f"seed={seed}",
            ),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in launches]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    seed = next(s for s, (rc, _) in enumerate(results) if rc == 0)
    loser = next(e for rc, e in results if rc == 1)
    assert re.search(
        r"^error: hydra.run.dir=.* (is in use by another job|holds another run's)", loser, re.M
    ), loser
    saved = {run_config(p).seed for p in (tmp_path / "checkpoints").glob("step_*")}
    assert saved == {seed}


@pytest.mark.slow
def test_a_refused_launch_keeps_hydra_config_and_tools_read_the_checkpoints_own(tmp_path):
    train(_config("trainer.max_steps=2", "checkpoint.every_n_steps=2"), tmp_path)
    hydra_config = tmp_path / ".hydra" / "config.yaml"
    hydra_config.parent.mkdir()
    hydra_config.write_text("model:\n  block: pre\n")  # what a later launch could leave there
    before = hydra_config.read_text()
    result = run_train(tmp_path, *COMMON, "model.block=pre", f"resume={tmp_path / 'nowhere'}")
    assert result.returncode == 1 and "error: hydra.run.dir=" in result.stderr, result.stderr
    assert hydra_config.read_text() == before
    assert run_config(tmp_path / "checkpoints" / "step_2").model.block == "reordered"


def test_a_run_dir_without_its_run_record_never_loses_its_checkpoints(tmp_path):
    """Issue 25, item 3: resume=auto continues the run every marker names, and stops with one
    line, touching nothing, when the markers do not establish one owner."""
    steps = ("trainer.max_steps=1000", "checkpoint.every_n_steps=1", "checkpoint.keep_last=10")
    train(_config(*steps, "trainer.stop_at_step=2"), tmp_path)
    run_id = read_run_id(tmp_path)
    step1 = tmp_path / "checkpoints" / "step_1"
    marker = (step1 / COMPLETE).read_text()
    (tmp_path / "run.json").unlink()
    (step1 / COMPLETE).write_text(marker.replace(run_id, "otherrun"))
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(
        ConfigError,
        match=f"^hydra.run.dir={re.escape(str(tmp_path))} has no run.json, and its checkpoints do "
        f"not all name one run \\(step_1: otherrun, step_2: {run_id}\\); move the ones",
    ):
        train(_config(*steps, "trainer.stop_at_step=3", "resume=auto"), tmp_path)
    after = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    assert after == before and not (tmp_path / "run.json").exists()
    (step1 / COMPLETE).write_text(marker)
    train(_config(*steps, "trainer.stop_at_step=3", "resume=auto"), tmp_path)
    assert read_run_id(tmp_path) == run_id
    assert _steps(tmp_path) == ["step_1", "step_2", "step_3"]
    assert (step1 / COMPLETE).read_text() == marker
    resumed = (tmp_path / "csv" / "version_1" / "metrics.csv").read_text()
    assert [r["step"] for r in csv.DictReader(resumed.splitlines()) if r["train/loss"]] == ["3"]


def test_resume_with_another_architecture_or_data_names_the_fields(tmp_path):
    train(_config("trainer.max_steps=2", "checkpoint.every_n_steps=2"), tmp_path)
    for override, message in [
        ("model.block=pre", "model.block: checkpoint reordered, now pre"),
        ("model.norm_type=layer", "model.norm_type: checkpoint rms, now layer"),
        ("model.d_model=128", "model.d_model: checkpoint 64, now 128"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            train(_config("trainer.max_steps=3", "resume=auto", override), tmp_path)
    with pytest.raises(
        DataError,
        match="^resume: the checkpoint's data loader does not match "
        "this run's data .*'global_batch_size': \\(8, 16\\)",
    ):
        train(_config("trainer.max_steps=3", "resume=auto", "data.global_batch_size=16"), tmp_path)
    # A field that does not change what the weights compute may differ.
    train(_config("trainer.max_steps=3", "resume=auto", "model.init_std=0.05"), tmp_path)
    assert "step_3" in _steps(tmp_path)


def test_resume_verifies_and_falls_back_past_damaged_checkpoints(tmp_path, caplog):
    config = _config(
        *LONG[len(COMMON) :],
        "trainer.stop_at_step=4",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_last=3",
    )
    train(config, tmp_path)
    run_id, step2, step4 = (
        read_run_id(tmp_path),
        *(tmp_path / "checkpoints" / s for s in ("step_2", "step_4")),
    )
    state = step4 / STATE_FILE
    good = state.read_bytes()

    def auto() -> str | None:
        return resolve_resume("auto", tmp_path, False, run_id, config.model)

    damaged = bytearray(good)
    damaged[len(good) // 2 : len(good) // 2 + 4] = bytes(
        255 - b for b in good[len(good) // 2 :][:4]
    )
    for content, reason in [
        (bytes(damaged), "state.ckpt does not match its digest"),
        (b"\0" * len(good), "state.ckpt does not match its digest"),
        (good[: len(good) // 2], f"state.ckpt has {len(good) // 2} bytes, its marker says"),
    ]:
        state.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert auto() == str(step2 / STATE_FILE)
        assert f"skipping {step4}: {reason}" in caplog.text
        with pytest.raises(
            ConfigError, match=f"resume: {step4} is not a usable checkpoint: {reason}"
        ):
            resolve_resume(str(step4), tmp_path, False, run_id, config.model)
    (step4 / COMPLETE).unlink()  # an unfinished save
    assert auto() == str(step2 / STATE_FILE)
    (step2 / STATE_FILE).unlink()
    with pytest.raises(
        ConfigError,
        match="no checkpoint under .* verifies \\(step_4: no COMPLETE "
        "marker .*; step_2: state.ckpt is missing\\)",
    ):
        auto()


def test_resume_auto_without_checkpoints_says_it_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train(
            _config("trainer.max_steps=1", "resume=auto", "checkpoint.save_final=false"), tmp_path
        )
    assert f"no checkpoint under {tmp_path / 'checkpoints'}: starting fresh" in caplog.text


class SignalAt(L.Callback):
    """Sends this process ``signum`` at the end of the given optimizer step."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(
        _config(*LONG[len(COMMON) :], "trainer.stop_at_step=8", "checkpoint.every_n_steps=0"),
        run_dir,
    )
    return series(run_dir, "train/loss")


def test_a_signal_saves_at_the_next_step_and_resume_is_exact(tmp_path, uninterrupted, monkeypatch):
    """SIGUSR1 under SLURM: a checkpoint at the next step boundary, the job requeued, and the
    resumed run continues bitwise as if never stopped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "requeued"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = tmp_path / "run"
    config = _config(*LONG[len(COMMON) :], "checkpoint.every_n_steps=0")
    handler = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Interrupted) as stopped:
        train(config, run_dir, callbacks=[SignalAt(signal.SIGUSR1, 3)])
    assert (stopped.value.step, stopped.value.exit_code, stopped.value.requeued) == (4, 138, True)
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert _steps(run_dir) == ["step_4"]
    assert signal.getsignal(signal.SIGUSR1) == handler  # restored
    monkeypatch.delenv("SLURM_JOB_ID")
    train(
        _config(
            *LONG[len(COMMON) :],
            "trainer.stop_at_step=8",
            "checkpoint.every_n_steps=0",
            "resume=auto",
        ),
        run_dir,
    )
    resumed = series(run_dir, "train/loss")
    assert [resumed[s] for s in range(1, 9)] == [uninterrupted[s] for s in range(1, 9)]


def test_a_second_ctrl_c_stops_at_once():
    stop = StopOnSignal(checkpoint=None, requeue_signal=None)  # type: ignore[arg-type]
    stop._handle(signal.SIGINT, None)
    assert stop.received == signal.SIGINT
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_for_step(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if max(series(run_dir, "train/loss"), default=0) >= step:
                return
        except FileNotFoundError:  # the CSV file is not written yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}")


def _signal_at_step_2(run_dir: Path, overrides: list[str], signum: int) -> tuple[int, str]:
    """Launch ``train.py`` into ``run_dir``, send ``signum`` once it logged step 2, and return
    its exit status and stderr."""
    process = subprocess.Popen(
        train_command(run_dir, *overrides),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(run_dir, 2, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=240)
    return process.returncode, err


@pytest.mark.slow  # end to end; test_a_signal_saves_at_the_next_step_... covers it in process
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_exit_nonzero_and_say_how_to_resume(
    tmp_path, uninterrupted, signum
):
    # The thread count of the in-process run it is compared with, bit for bit.
    pinned = [*LONG, f"trainer.cpu_threads={torch.get_num_threads()}"]
    returncode, err = _signal_at_step_2(tmp_path, pinned, signum)
    assert returncode == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    found = re.search(
        rf"^stopped: {name} at step (\d+): saved (\S+); resume with: python train.py "
        rf".* resume=auto hydra.run.dir={tmp_path}$",
        err,
        re.M,
    )
    assert found, err[-3000:]
    step = int(found.group(1))
    assert found.group(2) == str(tmp_path / "checkpoints" / f"step_{step}") and step < 8
    check(run_train(tmp_path, *pinned, "trainer.stop_at_step=8", "resume=auto"))
    resumed = series(tmp_path, "train/loss")
    assert [resumed[s] for s in range(1, 9)] == [uninterrupted[s] for s in range(1, 9)]


def _write_shards(out: Path) -> Path:
    """A few thousand tokens of shards with their own 300-token tokenizer."""
    from olmo_mini.data import load_tokenizer, train_bpe, write_shards
    from olmo_mini.data.corpus import file_documents
    from tests.data.conftest import make_docs, write_jsonl

    out.mkdir()
    corpus = write_jsonl(out.parent / "docs.jsonl", make_docs(300))
    train_bpe(make_docs(200, seed=1), vocab_size=300).save(str(out.parent / "tokenizer.json"))
    tokenizer = load_tokenizer(out.parent / "tokenizer.json")
    write_shards(file_documents([corpus]), tokenizer, 0, out, str(corpus), 0.1, procs=1)
    return out


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_saves_and_stops(tmp_path):
    """What SLURM and Ctrl-C do: the signal reaches the loader workers too, which must leave
    stopping to the main process (issue 25, item 1)."""
    run_dir = tmp_path / "run"
    shards = [
        *LONG,
        "data=shards",
        f"data.shards={_write_shards(tmp_path / 'shards')}",
        "data.num_workers=2",
        "trainer.cpu_threads=1",
    ]
    process = subprocess.Popen(
        train_command(run_dir, *shards),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: train.py and its loader workers
    )
    _wait_for_step(run_dir, 2, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    found = re.search(
        rf"^stopped: SIGTERM at step (\d+): saved (\S+); resume with: python train.py .* "
        rf"resume=auto hydra.run.dir={run_dir}$",
        err,
        re.M,
    )
    assert found, err[-3000:]
    assert verify(Path(found.group(2))) is None
    check(run_train(run_dir, *shards, "trainer.stop_at_step=8", "resume=auto"))
    assert max(series(run_dir, "train/loss")) == 8


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_fsdp_ranks_with_a_checkpoint(tmp_path, uninterrupted):
    fsdp = [*LONG, "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"]
    # To the launcher (rank 0) only, as a scheduler might.
    returncode, err = _signal_at_step_2(tmp_path, fsdp, signal.SIGTERM)
    assert returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    step = int(re.search(r"^stopped: SIGTERM at step (\d+)", err, re.M).group(1))
    assert len(list((tmp_path / "checkpoints" / f"step_{step}").glob("*.distcp"))) == 2
    check(run_train(tmp_path, *fsdp, "trainer.stop_at_step=8", "resume=auto"))
    resumed = series(tmp_path, "train/loss")
    for s in range(1, 9):
        assert resumed[s] == pytest.approx(uninterrupted[s], rel=1e-4), s


def test_no_checkpoint_is_saved_during_a_skip_streak(tmp_path):
    config = _config(
        "trainer.max_steps=10",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_last=1",
        "optim.max_consecutive_skips=4",
    )
    with pytest.raises(TrainingDiverged, match="the last one before it: .*step_2$"):
        train(config, tmp_path, callbacks=[PoisonGradients({3, 4, 5, 6})])
    assert _steps(tmp_path) == ["step_2"]


class FullDisk(L.Callback):
    """The save of ``step`` writes part of its file, then fails as a full disk does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_start(self, trainer, pl_module):
        original = trainer.save_checkpoint

        def save_checkpoint(path, *args, **kwargs):
            if f".step_{self.step}." in str(path):
                Path(path).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return original(path, *args, **kwargs)

        trainer.save_checkpoint = save_checkpoint


def test_a_failed_save_cleans_up_and_the_next_launch_resumes(tmp_path):
    config = _config(*LONG[len(COMMON) :], "trainer.stop_at_step=6", "checkpoint.every_n_steps=2")
    with pytest.raises(
        CheckpointError,
        match="step_4 could not be written .*No space left on device; removed its partial files",
    ):
        train(config, tmp_path, callbacks=[FullDisk(4)])
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]
    # Another job's save in progress and another run's checkpoint: pruning leaves both alone.
    (checkpoints / ".step_9.otherrun.tmp").mkdir()
    foreign = Path(shutil.copytree(checkpoints / "step_2", checkpoints / "step_1"))
    marker = json.loads((foreign / COMPLETE).read_text())
    (foreign / COMPLETE).write_text(json.dumps({**marker, "run_id": "otherrun"}))
    train(
        _config(
            *LONG[len(COMMON) :],
            "trainer.stop_at_step=6",
            "checkpoint.every_n_steps=2",
            "resume=auto",
        ),
        tmp_path,
    )
    assert _steps(tmp_path) == ["step_1", "step_4", "step_6"]
    assert (checkpoints / ".step_9.otherrun.tmp").is_dir()


def test_unknown_keys_and_bad_values_are_one_line_naming_the_key():
    with pytest.raises(
        ConfigError, match="^trainer.max_step: no such config key; did you mean trainer.max_steps"
    ):
        compose_config("+trainer.max_step=5")
    for override, key in [
        ("+trainer.foo=1", "trainer.foo"),
        ("+optim.learning_rate=1e-4", "optim.learning_rate"),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}: no such config key"):
            compose_config(override)
    with pytest.raises(ConfigError, match="^model.d_model must be a positive integer, got -3$"):
        compose_config("model.d_model=-3")


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock(tmp_path, monkeypatch):
    """Same job id, same restart count: another live step of the allocation (refused); an
    earlier restart count: the job before its requeue, gone (taken over)."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    live = {"host": "othernode", "pid": 1, "slurm_job_id": "77", "slurm_restart_count": "1"}
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps(live))
    with pytest.raises(
        ConfigError, match="in use by another job \\(pid 1 on othernode, SLURM job 77"
    ):
        lock(tmp_path)
    lock_file.write_text(json.dumps({**live, "slurm_restart_count": "0"}))
    lock(tmp_path)
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    release(tmp_path)
    assert not lock_file.exists()


class FullDiskFile:
    """A file open for writing on a full disk: every write fails."""

    def __init__(self, file) -> None:
        self.file = file

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def test_a_lock_that_a_full_disk_kept_from_being_written_blocks_no_later_launch(
    tmp_path, monkeypatch, caplog
):
    """Issue 25, item 5: the failed launch stops with one line and leaves nothing; an empty lock
    (left by a launch that wrote it in place) is taken over."""
    real_open = io.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        return FullDiskFile(opened) if "w" in mode else opened

    with monkeypatch.context() as patch:
        patch.setattr(io, "open", full_disk_open)
        with pytest.raises(
            ConfigError,
            match=f"^hydra.run.dir={re.escape(str(tmp_path))}: cannot take run.lock: "
            "No space left on device$",
        ):
            lock(tmp_path)
    assert list(tmp_path.iterdir()) == []
    lock(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    release(tmp_path)
    (tmp_path / LOCK_FILE).write_text("")
    with caplog.at_level(logging.WARNING):
        lock(tmp_path)
    assert f"taking over the stale lock {tmp_path / LOCK_FILE} (empty)" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    release(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    [
        "plain-dir_1.x",
        "with space",
        "it's",
        'say "hi"',
        "naïve ünïcödé",
        "a,b",
        "lr=1e-3",
        "[x]{y}(z)",
        " edges ",
        "back\\slash\\",
        "quote\\'d",
        "${oc.env:HOME}",
    ],
)
def test_the_printed_resume_command_reads_back_the_run_dir(tmp_path, monkeypatch, name):
    """Issue 25, item 8: pasted into a shell, the command gives Hydra the run dir as it is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    run_dir = tmp_path / name
    monkeypatch.setattr(sys, "argv", ["/src/train.py", "debug=smoke", f"hydra.run.dir={run_dir}"])
    words = shlex.split(resume_command(run_dir))
    assert words[:3] == ["python", "train.py", "debug=smoke"] and words[3] == "resume=auto"
    override = OverridesParser.create().parse_override(words[4])
    assert override.key_or_group == "hydra.run.dir"
    assert OmegaConf.create({"dir": override.value()}).dir == str(run_dir)  # as Hydra resolves it
    assert len(words) == 5


def test_a_hanging_scontrol_requeue_is_stopped_and_said(tmp_path, monkeypatch, caplog):
    """Issue 25, item 9: the exit waits at most REQUEUE_TIMEOUT_S for scontrol."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nexec sleep 60\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(interrupt, "REQUEUE_TIMEOUT_S", 0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert interrupt._requeue() is False
    assert time.monotonic() - started < 5
    assert caplog.messages == [
        "could not requeue SLURM job 4242: scontrol requeue gave no answer in 0.5 s (stopped it; "
        "requeue by hand with: scontrol requeue 4242)"
    ]


@pytest.mark.slow
def test_a_resume_trains_with_the_threads_its_run_recorded(tmp_path):
    """Issue 25, item 6: the count in run.json, not the load of the machine it resumes on."""
    train(_config(*LONG[len(COMMON) :], "trainer.stop_at_step=2"), tmp_path)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["cpu_threads"] == torch.get_num_threads()
    (tmp_path / "run.json").write_text(json.dumps({**record, "cpu_threads": 3}))
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    resumed = subprocess.run(
        train_command(tmp_path, *LONG, "trainer.stop_at_step=3", "resume=auto"),
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    check(resumed)
    assert re.search(
        r"^.*CPU threads: 3 per process, as the run trained with \(its run.json; "
        r"trainer.cpu_threads=N sets another\)$",
        resumed.stdout,
        re.M,
    ), resumed.stdout[-3000:]
