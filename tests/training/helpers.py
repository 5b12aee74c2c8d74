"""Shared pieces of the training tests: a small config, subprocess runs, reading metrics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from olmo_mini import config
from olmo_mini.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]

# A model and batch small enough for a step in tens of milliseconds on one CPU core.
SMALL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=2",
    "model.mlp_hidden_size=128",
    "data.seq_len=64",
    "data.global_batch_size=8",
    "data.micro_batch_size=2",
    "data.val_batches=1",
    "trainer.precision=32-true",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.sample_new_tokens=4",
    "optim.warmup_steps=2",
    "logger=none",
]


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
