"""wandb runs as a user finds them: named, grouped and tagged from the launch, one wandb run per
training run across resumes, online only with credentials, offline when the server is out of
reach, none for a run refused before its first step. Read back from the files wandb wrote."""

import os
import socket
import subprocess
from pathlib import Path

import lightning as L
import pytest
import wandb

from olmo_mini.analysis.runs import load_run_dir, read_wandb_records
from olmo_mini.config import ConfigError, LoggerConfig
from olmo_mini.training import train
from olmo_mini.training.wandb_run import choose_mode, label, override_tags
from tests.training.helpers import CHECKPOINTS, REPO, check, compose_config, train_command


def wandb_launches(run_dir: Path) -> list[dict]:
    """Each offline launch in ``run_dir``, oldest first: its run record's fields, the optimizer
    steps of its training rows and its exit code (None when it did not finish)."""
    launches = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (wandb_file,) = folder.glob("run-*.wandb")
        records, note = read_wandb_records(wandb_file)
        assert note is None, note
        launch = {"folder": folder.name, "steps": [], "exit_code": None}
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                launch |= {
                    "id": run.run_id,
                    "name": run.display_name,
                    "group": run.run_group,
                    "tags": list(run.tags),
                    "project": run.project,
                }
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key) for item in record.history.item}
                if "train/loss" in items:
                    step = next(
                        i for i in record.history.item if "trainer/global_step" in i.nested_key
                    )
                    launch["steps"].append(int(step.value_json))
            elif kind == "exit":
                launch["exit_code"] = record.exit.exit_code
        launches.append(launch)
    return launches


def test_tags_are_the_overrides_settings_in_short_form():
    overrides = [
        "optim.lr=1e-3",
        "+experiment=qk_lr_sweep_cpu",
        "model=olmo2_small",
        "debug=smoke",
        "logger=wandb",  # where and how a run is launched, logged or saved: not a setting
        "cluster=slurm",
        "logger.tags=[a]",
        "checkpoint.every_n_steps=2",
        "resume=auto",
        "~model.compile",
        "data.files=[" + "x" * 80 + "]",
    ]
    tags = override_tags(overrides)
    assert tags[:4] == ["lr=1e-3", "experiment=qk_lr_sweep_cpu", "model=olmo2_small", "debug=smoke"]
    assert len(tags) == 5 and tags[4].startswith("files=[xxx") and len(tags[4]) == 64


def test_the_users_name_group_and_tags_win_and_a_study_passes_its_own():
    study = label(LoggerConfig(), "A/qk_norm=none/lr1e-3/s0", "A", ["optim.lr=1e-3"], ["none"])
    assert (study.name, study.group, study.tags) == (
        "A/qk_norm=none/lr1e-3/s0",
        "A",
        ["none", "lr=1e-3"],
    )
    mine = LoggerConfig(name="mine", group="g", tags=["v2", "lr=1e-3"])
    labelled = label(mine, "run-dir", "sweep", ["optim.lr=1e-3", "seed=1"])
    assert (labelled.name, labelled.group, labelled.tags) == (
        "mine",
        "g",
        ["v2", "lr=1e-3", "seed=1"],
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("entity", "me/team", "logger.entity must be a non-empty name without any of"),
        ("project", "", "logger.project must be a non-empty name"),
        ("group", "", "logger.group must not be empty"),
        ("tags", ["t" * 65], "logger.tags: each tag must be 1 to 64 characters"),
    ],
)
def test_logger_fields_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        LoggerConfig(**{field: value})


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """No credentials, settings or mode from this machine: a fresh home for wandb."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    wandb.teardown()  # wandb reads its settings once per process
    yield home
    wandb.teardown()


def test_online_only_where_wandb_finds_credentials(wandb_home, monkeypatch):
    assert choose_mode(None) == (
        "offline",
        "no wandb credentials; `wandb login` or WANDB_API_KEY to log online",
    )
    (wandb_home / ".netrc").write_text(
        f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n"
    )
    (wandb_home / ".netrc").chmod(0o600)
    wandb.teardown()
    assert choose_mode(None) == ("online", "credentials")  # as `wandb login` leaves them
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    assert choose_mode(None) == ("offline", "WANDB_MODE=offline")
    assert choose_mode("disabled") == ("disabled", "logger.mode=disabled")


def test_a_resumed_run_continues_its_wandb_run_and_step_axis(tmp_path):
    common = ("debug=smoke", "logger=wandb", *CHECKPOINTS, "checkpoint.every_n_steps=2")
    train(compose_config(*common, "trainer.max_steps=4", "trainer.stop_at_step=2"), tmp_path)
    train(compose_config(*common, "trainer.max_steps=4", "resume=auto"), tmp_path)
    first, second = wandb_launches(tmp_path)
    assert first["id"] == second["id"] and len(first["id"]) == 12
    assert first["name"] == second["name"] == tmp_path.name
    assert (first["steps"], second["steps"]) == ([1, 2], [3, 4])
    assert first["exit_code"] == second["exit_code"] == 0
    assert [row["step"] for row in load_run_dir(tmp_path).history if "train/loss" in row] == [
        1,
        2,
        3,
        4,
    ]
    # ... and `wandb sync` would upload both launches as that one run.
    folders = sorted((tmp_path / "wandb").glob(f"offline-run-*-{first['id']}"))
    sync = subprocess.run(
        ["wandb", "sync", "--dry-run", *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    listed = [line.split()[-1] for line in (sync.stdout + sync.stderr).splitlines()]
    files = [Path(line).name for line in listed if line.endswith(".wandb")]
    assert files == [f"run-{first['id']}.wandb"] * 2, sync.stdout + sync.stderr


class RefuseAtStart(L.Callback):
    """A rule found wrong after setup and the checkpoint's restore, before training starts."""

    def on_fit_start(self, trainer, module):
        raise ConfigError("refused")


def test_a_run_refused_before_its_first_step_leaves_no_wandb_run(tmp_path):
    config = compose_config("debug=smoke", "logger=wandb")
    with pytest.raises(ConfigError, match="refused"):
        train(config, tmp_path, callbacks=[RefuseAtStart()])
    assert not (tmp_path / "wandb").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_leaves_a_run_finished_offline_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-settings"),
        "WANDB_API_KEY": "k" * 40,
        "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}",
        "WANDB_INIT_TIMEOUT": "3",
    }
    run_dir = tmp_path / "run"
    command = train_command(run_dir, "debug=smoke", "logger=wandb", "trainer.max_steps=2")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    check(result)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "wandb" in line[:6]]
    assert len(lines) == 1 and lines[0].startswith("wandb could not start online ("), lines
    assert f"wandb sync {run_dir}/wandb/offline-run-*-" in lines[0]
    (launch,) = wandb_launches(run_dir)
    assert launch["exit_code"] == 0 and launch["steps"] == [1, 2]
    assert launch["name"] == "run" and launch["group"] == ""  # no experiment: no group
    assert launch["tags"] == ["debug=smoke", "max_steps=2"]
    assert not list((run_dir / "wandb").glob("run-*"))  # nothing left of the failed start


@pytest.mark.slow
def test_sweep_runs_are_named_grouped_and_tagged_by_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            *train_command(tmp_path / "unused", "-m", "debug=smoke", "logger=wandb"),
            "trainer.max_steps=1",
            "optim.lr=1e-3,2e-3",
            "logger.tags=[v2]",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    check(result)
    runs = [wandb_launches(sweep / job)[0] for job in ("0", "1")]
    for run, lr in zip(runs, ("0.001", "0.002"), strict=True):  # as Hydra's sweeper writes them
        assert run["group"] == str(sweep) and run["project"] == "olmo-mini"
        name = f"debug=smoke,logger.tags=[v2],logger=wandb,optim.lr={lr},trainer.max_steps=1"
        assert run["name"] == name  # Hydra's job.override_dirname
        assert run["tags"] == ["v2", "debug=smoke", "max_steps=1", f"lr={lr}"]
    assert runs[0]["id"] != runs[1]["id"]
