"""Shared pieces of the training tests: subprocess runs, reading metrics. Runs start from
``debug=smoke`` (configs/debug/smoke.yaml): a tiny model, fp32, no checkpoints, no wandb."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from olmo_mini import config
from olmo_mini.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]

# The checkpoint group's defaults, which debug=smoke (configs/debug/smoke.yaml) turns off, for
# runs whose checkpoints a test reads.
CHECKPOINTS = ("checkpoint.every_n_steps=100", "checkpoint.save_final=true")


def compose_config(*overrides: str) -> TrainConfig:
    return config.compose_config(overrides)


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]


def run_train(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py`` in a subprocess (multi-process runs need their own process tree)."""
    return subprocess.run(
        train_command(run_dir, *overrides),
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of every launch's ``metrics.csv`` in the run dir, in launch order."""
    versions = sorted(
        (run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.removeprefix("version_"))
    )
    rows: list[dict[str, str]] = []
    for version in versions:
        with open(version / "metrics.csv") as f:
            rows.extend(csv.DictReader(f))
    return rows


def series(run_dir: Path, key: str) -> dict[int, float]:
    """``step -> value`` of ``key``; a step logged twice (a resumed run) keeps its last value."""
    return {int(r["step"]): float(r[key]) for r in metrics(run_dir) if r.get(key)}
