"""Launching on clusters, on CPU: torchrun and simulated SLURM tasks on gloo, the ``cluster``
config group (Hydra's submitit launcher), a submitit local sweep and the study's configs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from olmo_mini.analysis.runs import find_runs, load_run, read_wandb_records
from olmo_mini.config import load_config
from olmo_mini.training.parallel import build_strategy, cluster_plugins
from tests.training.helpers import REPO, check, compose_config, series, train_command

LR_GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
# Four steps of the same global batch (8 sequences) on one process and on two.
RUN = [
    "debug=smoke",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.accelerator=cpu",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(ntasks: int, procid: int, port: int) -> dict[str, str]:
    """What ``srun`` sets for task ``procid`` of ``ntasks`` on one node."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "olmo-mini",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(ntasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def torchrun_env(nproc: int, rank: int) -> dict[str, str]:
    """What ``torchrun --nnodes 1 --nproc-per-node nproc`` sets for ``rank``."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "test",
    }


@pytest.mark.parametrize(
    ("env", "devices", "expected"),
    [
        (slurm_env(1, 0, 29500), 1, SLURMEnvironment),
        (slurm_env(2, 1, 29500), 2, SLURMEnvironment),
        (torchrun_env(2, 1), 2, TorchElasticEnvironment),
    ],
    ids=["slurm-1-task", "slurm-2-tasks", "torchrun-2-procs"],
)
def test_lightning_takes_ranks_from_the_launcher(monkeypatch, env, devices, expected):
    """Under srun or torchrun every process is started outside Lightning: it must read its rank
    from the environment and start no processes of its own."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The Trainer sets this process-wide rank; restore it, or later tests' loggers go silent.
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    config = compose_config("trainer=fsdp", f"trainer.devices={devices}").trainer
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=build_strategy(config), logger=False
    )
    assert type(trainer.strategy.cluster_environment) is expected
    assert trainer.strategy.launcher is None  # nothing spawned
    rank = int(env.get("SLURM_PROCID", env.get("RANK")))
    assert (trainer.global_rank, trainer.world_size) == (rank, devices)


@pytest.mark.parametrize(
    ("env", "devices", "slurm"),
    [(slurm_env(1, 0, 29500), 1, True), (torchrun_env(2, 1), 2, False)],
    ids=["slurm", "torchrun"],
)
def test_under_slurm_lightning_leaves_the_requeue_to_the_project(monkeypatch, env, devices, slurm):
    """``StopOnSignal`` saves and requeues on the requeue signal; Lightning's own SLURM handler
    (which requeues without saving) is switched off, not merely overridden."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp", plugins=cluster_plugins(), logger=False
    )
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) == slurm
    assert not slurm or environment.auto_requeue is False


@pytest.mark.slow
def test_torchrun_and_slurm_tasks_train_like_one_process(tmp_path):
    """One simulated SLURM task trains; two processes started by torchrun, and two simulated
    SLURM tasks, give the same losses as that single process for the same global batch."""
    base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    single = tmp_path / "slurm1"
    check(
        subprocess.run(
            train_command(single, *RUN),
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**base, **slurm_env(1, 0, free_port())},
            timeout=300,
        )
    )
    reference = series(single, "train/loss")
    assert sorted(reference) == [1, 2, 3, 4]

    fsdp = [*RUN, "trainer=fsdp", "trainer.devices=2"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
    ]
    check(
        subprocess.run(
            [*torchrun, *train_command(tmp_path / "torchrun", *fsdp)[1:]],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=base,
            timeout=300,
        )
    )

    port = free_port()
    tasks = [
        subprocess.Popen(
            train_command(tmp_path / "slurm2", *fsdp),
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**base, **slurm_env(2, rank, port)},
        )
        for rank in (0, 1)
    ]
    for rank, task in enumerate(tasks):
        _, err = task.communicate(timeout=300)
        assert task.returncode == 0, err[-4000:]
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in err

    for launched in ("torchrun", "slurm2"):
        losses = series(tmp_path / launched, "train/loss")
        assert sorted(losses) == [1, 2, 3, 4], launched
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-4), (launched, step)


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_cluster_slurm_passes_its_resources_to_submitit_and_the_trainer():
    overrides = [
        "cluster=slurm",
        "trainer=fsdp",
        "cluster.nodes=2",
        "cluster.gpus_per_node=4",
        "cluster.partition=gpu",
        "cluster.account=proj42",
        "cluster.time_min=240",
        "cluster.mem_gb=200",
        "data.global_batch_size=64",
    ]
    launcher = OmegaConf.to_container(compose_with_hydra(*overrides).hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert {
        k: launcher[k]
        for k in (
            "nodes",
            "gpus_per_node",
            "tasks_per_node",
            "partition",
            "account",
            "timeout_min",
            "mem_gb",
            "cpus_per_task",
        )
    } == {
        "nodes": 2,
        "gpus_per_node": 4,
        "tasks_per_node": 4,
        "partition": "gpu",
        "account": "proj42",
        "timeout_min": 240,
        "mem_gb": 200,
        "cpus_per_task": 8,
    }
    config = compose_config(*overrides)
    assert (config.trainer.num_nodes, config.trainer.devices) == (2, 4)
    assert config.grad_accum_steps == 1  # 64 sequences / (8 per device × 8 devices)


def test_cluster_local_is_the_default_and_runs_here():
    cfg = compose_with_hydra()
    assert cfg.hydra.runtime.choices.cluster == "local"
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    assert compose_config().cluster is None


@pytest.mark.parametrize("experiment", ["qk_lr_sweep", "qk_lr_sweep_cpu"])
def test_study_sweeps_the_lr_grid_with_and_without_qk_norm(monkeypatch, experiment):
    cfg = compose_with_hydra(f"+experiment={experiment}", "optim.lr=0.1", "model.qk_norm=none")
    params = cfg.hydra.sweeper.params
    assert [float(lr) for lr in params["optim.lr"].split(",")] == LR_GRID
    assert params["model.qk_norm"].split(",") == ["full", "none"]
    # The run names come from Hydra's job config, as in a launched job.
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    config = load_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert config.logger.kind == "wandb" and config.stability.enabled
    assert config.logger.name == "model.qk_norm=none,optim.lr=0.1"
    assert config.logger.tags == [experiment]
    assert 0.03 <= config.optim.warmup_steps / config.trainer.max_steps <= 0.07


@pytest.mark.slow
def test_submitit_local_sweep_writes_a_run_dir_per_point(tmp_path):
    """A 2-point multirun through Hydra's submitit launcher and submitit's local executor."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "-m",
            "cluster=submitit_local",
            "optim.lr=1e-3,1e-2",
            *RUN,
            "trainer.max_steps=2",
            "logger=wandb",
            "logger.tags=[t]",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    check(result)
    runs = sorted((load_run(spec) for spec in find_runs(sweep)), key=lambda r: r.config["optim.lr"])
    assert [(r.source, r.config["optim.lr"]) for r in runs] == [
        (str(sweep / "0"), 1e-3),
        (str(sweep / "1"), 1e-2),
    ]
    for run, lr in zip(runs, ("0.001", "0.01"), strict=True):
        assert run.final_step == 2 and run.series("val/loss")[0].tolist() == [2]
        (wandb_file,) = Path(run.source).glob("wandb/offline-run-*/run-*.wandb")
        records, _ = read_wandb_records(wandb_file)
        (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        # The user's tag, then the job's overrides in short form (docs/wandb.md).
        tags = ["t", f"lr={lr}", "debug=smoke", "max_steps=2", "val_check_interval=2"]
        assert (meta.run_group, list(meta.tags)) == (str(sweep), [*tags, "accelerator=cpu"])
