"""The run reader against real offline wandb runs, Lightning's loggers and damaged files."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wandb
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from olmo_mini.analysis.runs import RunReadError, find_runs, load_run, read_wandb_records

CONFIG = {
    "optim": {"lr": 1e-3, "betas": [0.9, 0.95]},
    "model": {"qk_norm": "full", "n_layers": 2},
    "seed": 0,
    # Larger than a 32 KiB block: the run record is split into first, middle and last chunks.
    "notes": "x" * 70_000,
}


def logged_rows(n: int) -> list[dict[str, float]]:
    """Rows as a training run logs them: every 10 steps, val every 50, (n > 5) an inf and a NaN."""
    rows = []
    for i in range(n):
        step = 10 * i
        row: dict[str, float] = {"step": step, "train/loss": 5.0 - 0.01 * i, "train/lr": 1e-3}
        for layer in range(2):
            row[f"qk/layer{layer}/q_rms"] = 1.0 + 0.1 * layer + 0.001 * i
            row[f"attn/layer{layer}/max_logit"] = 2.0 * (layer + 1) + 0.5 * i
        if step % 50 == 0:
            row["val/loss"] = 5.1 - 0.01 * i
        rows.append(row)
    if n > 5:
        rows[3]["train/loss"] = math.inf
        rows[5]["val/loss"] = math.nan
    return rows


def write_csv_run(run_dir: Path, config: dict[str, Any], rows: list[dict[str, float]]) -> Path:
    """A ``logger=none`` run dir: Hydra's config file and Lightning's CSVLogger metrics."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    logger = CSVLogger(run_dir, name="csv")
    for row in rows:
        logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
    logger.save()
    return run_dir


@pytest.fixture(scope="module")
def init_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, float]]]:
    """A run made with ``wandb.init(mode="offline")``, logging with explicit steps."""
    root = tmp_path_factory.mktemp("init_run")
    rows = logged_rows(200)  # > 32 KiB of history: records also straddle blocks
    run = wandb.init(
        mode="offline",
        dir=root,
        config=CONFIG,
        name="baseline",
        project="t",
        settings=wandb.Settings(console="off", silent=True),
    )
    for row in rows:
        run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    run.finish()
    wandb.teardown()  # wait for wandb's service to flush the run file before reading it
    return root, rows


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, float]]]:
    """A Hydra run dir whose metrics went through Lightning's WandbLogger, as train.py logs."""
    run_dir = tmp_path_factory.mktemp("lightning_run")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"model": {"qk_norm": "none"}, "logger": {"kind": "wandb"}})
    )
    rows = logged_rows(6)
    logger = WandbLogger(offline=True, save_dir=str(run_dir), project="t", name="lit")
    logger.log_hyperparams({"optim": {"lr": 3e-3, "betas": [0.9, 0.95]}, "seed": 1})
    for row in rows:
        logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    logger.experiment.finish()
    wandb.teardown()  # wait for wandb's service to flush the run file before reading it
    return run_dir, rows


def offline_folder(root: Path) -> Path:
    (folder,) = (root / "wandb").glob("offline-run-*")
    return folder


def test_wandb_init_run_reads_back_exactly_what_was_logged(init_run) -> None:
    root, rows = init_run
    for spec in (offline_folder(root), root, next(offline_folder(root).glob("run-*.wandb"))):
        run = load_run(spec)
        assert run.name == "baseline"
        assert run.config == {
            "optim.lr": 1e-3,
            "optim.betas": [0.9, 0.95],
            "model.qk_norm": "full",
            "model.n_layers": 2,
            "seed": 0,
            "notes": "x" * 70_000,
        }
        np.testing.assert_equal(run.history, rows)  # NaN equals NaN here
        assert run.notes == []
    steps, values = run.series("val/loss")
    assert steps.tolist() == list(range(0, 2000, 50))
    assert math.isnan(values[1]) and values[0] == pytest.approx(5.1)
    assert list(run.layer_series("attn", "max_logit")) == [0, 1]
    assert run.last("train/loss") == pytest.approx(5.0 - 0.01 * 199)
    assert run.final_step == 1990


def test_lightning_wandb_logger_rows_use_the_trainer_step(lightning_run) -> None:
    run_dir, rows = lightning_run
    run = load_run(run_dir)
    # Lightning logs without wandb's step=, so _step counts 0, 1, 2...; the optimizer step is
    # trainer/global_step. Hydra's file and the logged hyperparameters are merged.
    np.testing.assert_equal(run.history, rows)
    assert run.name == "lit"
    assert run.config == {
        "model.qk_norm": "none",
        "logger.kind": "wandb",
        "optim.lr": 3e-3,
        "optim.betas": [0.9, 0.95],
        "seed": 1,
    }


def test_a_file_cut_inside_a_record_reads_its_complete_part_and_says_so(init_run, tmp_path) -> None:
    root, rows = init_run
    source = offline_folder(root)
    folder = shutil.copytree(source, tmp_path / source.name)
    (wandb_file,) = folder.glob("run-*.wandb")
    data = wandb_file.read_bytes()
    cut = data.index(b"train/loss", len(data) // 2) + 3  # inside a history or summary record
    wandb_file.write_bytes(data[:cut])
    run = load_run(folder)
    assert 0 < len(run.history) < len(rows)
    np.testing.assert_equal(run.history, rows[: len(run.history)])
    (note,) = run.notes
    assert "incomplete" in note and wandb_file.name in note


def test_a_corrupt_byte_in_the_middle_is_an_error_naming_the_file(init_run, tmp_path) -> None:
    root, _ = init_run
    (source,) = offline_folder(root).glob("run-*.wandb")
    data = bytearray(source.read_bytes())
    data[data.index(b"train/loss", len(data) // 3)] ^= 0xFF
    damaged = tmp_path / source.name
    damaged.write_bytes(bytes(data))
    with pytest.raises(RunReadError, match=rf"{damaged.name}: corrupt chunk at byte \d+"):
        read_wandb_records(damaged)
    damaged.write_bytes(b"not a wandb file")
    with pytest.raises(RunReadError, match="not a wandb run file"):
        read_wandb_records(damaged)


def test_csv_run_dir_joins_resumed_launches(tmp_path) -> None:
    rows = logged_rows(6)
    write_csv_run(tmp_path, {"optim": {"lr": 0.01}, "logger": {"name": "plain"}}, rows[:5])
    resumed = [{**row, "train/loss": 9.0} for row in rows[3:]]
    logger = CSVLogger(tmp_path, name="csv")  # the relaunch writes csv/version_1
    # Its first row may be a later step's (a measurement logged before the flushed steps).
    for row in [resumed[1], resumed[0], *resumed[2:]]:
        logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    logger.save()
    run = load_run(tmp_path)
    assert run.name == "plain"
    assert run.config == {"optim.lr": 0.01, "logger.name": "plain"}
    np.testing.assert_equal(run.history, rows[:3] + resumed)


def test_find_runs_lists_a_sweeps_run_dirs(init_run, lightning_run, tmp_path) -> None:
    for i in (10, 2):
        write_csv_run(tmp_path / "sweep" / str(i), {"optim": {"lr": 0.1 * i}}, logged_rows(1))
    assert find_runs(tmp_path / "sweep") == [str(tmp_path / "sweep" / n) for n in ("2", "10")]
    assert find_runs(lightning_run[0]) == [str(lightning_run[0])]
    with pytest.raises(RunReadError, match="neither a run"):
        find_runs(tmp_path / "sweep" / "2" / ".hydra")


def test_missing_runs_and_the_api_offline_are_clear_errors(monkeypatch, tmp_path) -> None:
    with pytest.raises(RunReadError, match="no such run folder"):
        load_run(tmp_path / "nope")
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(RunReadError, match="needs network access.*WANDB_MODE=offline"):
        load_run("entity/project/abc123")
