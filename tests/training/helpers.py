"""Shared pieces of the training tests: subprocess runs, reading metrics, the host-sync check.
Runs start from ``debug=smoke`` (configs/debug/smoke.yaml): a tiny model, fp32, no checkpoints,
no wandb."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from olmo_mini import config
from olmo_mini.config import TrainConfig
from olmo_mini.training import train
from olmo_mini.training.module import LanguageModelModule
from olmo_mini.training.recorder import MetricRecorder
from olmo_mini.training.syncs import HostSyncDetector

REPO = Path(__file__).resolve().parents[2]

# The checkpoint group's defaults, which debug=smoke (configs/debug/smoke.yaml) turns off, for
# runs whose checkpoints a test reads.
CHECKPOINTS = ("checkpoint.every_n_steps=100", "checkpoint.save_final=true")


def overridden(base: Sequence[str], *changes: str) -> list[str]:
    """``base`` with ``changes`` in place of the entries that set the same keys: ``train.py``
    refuses a key given twice on one command line."""
    keys = {change.split("=")[0] for change in changes}
    return [*(o for o in base if o.split("=")[0] not in keys), *changes]


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


# Steps 1, 2, 4 and 6 measure stability statistics, QK-Clip runs on every micro-batch (4 a
# step), steps 3 and 6 flush, and training ends with a validation.
SYNC_CHECK = (
    "debug=smoke",
    "trainer.max_steps=6",
    "trainer.log_every_n_steps=3",
    "stability.every_n_steps=2",
    "trainer.val_check_interval=100",
    "optim.qk_clip_tau=100",
)


class SyncWindows(L.Callback):
    """Labels a :class:`HostSyncDetector`'s records by where training is: the optimizer step
    (an int) from the start of its first micro-batch to the end of its last (the module's
    ``on_train_batch_end``, which flushes, runs after every callback's), ``("flush", label)``
    inside ``MetricRecorder.flush``, ``"validation"``, and None elsewhere: setup, and before
    each micro-batch the loading of its batch and its transfer to the device (one
    ``non_blocking`` copy from pinned memory on CUDA), which Lightning does before
    ``on_train_batch_start``. With ``cuda_errors``, CUDA's own sync check
    (``torch.cuda.set_sync_debug_mode("error")``) is on inside the steps and off elsewhere."""

    def __init__(
        self, detector: HostSyncDetector, monkeypatch: pytest.MonkeyPatch, cuda_errors: bool = False
    ) -> None:
        self.detector = detector
        self.cuda_errors = cuda_errors
        flush, batch_end = MetricRecorder.flush, LanguageModelModule.on_train_batch_end

        def labelled_flush(recorder: MetricRecorder, *args: Any, **kwargs: Any) -> Any:
            outer = detector.label
            self._enter(("flush", outer))
            try:
                return flush(recorder, *args, **kwargs)
            finally:
                self._enter(outer)

        def closing_batch_end(module: LanguageModelModule, *args: Any) -> None:
            batch_end(module, *args)
            self._enter(None)

        monkeypatch.setattr(MetricRecorder, "flush", labelled_flush)
        monkeypatch.setattr(LanguageModelModule, "on_train_batch_end", closing_batch_end)

    def _enter(self, label: Any) -> None:
        self.detector.label = label
        if self.cuda_errors:
            torch.cuda.set_sync_debug_mode("error" if isinstance(label, int) else "default")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._enter(trainer.global_step + 1)

    def on_validation_start(self, *args: Any) -> None:
        self._enter("validation")

    def on_train_end(self, *args: Any) -> None:
        self._enter(None)


def host_syncs(
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    *overrides: str,
    callbacks: Sequence[L.Callback] = (),
    device: str = "cpu",
) -> dict[Any, list[str]]:
    """Train ``SYNC_CHECK`` + ``overrides`` under a :class:`HostSyncDetector` (the CPU proxy
    unless ``device="cuda"``); returns, per window of :class:`SyncWindows` other than None,
    its host syncs as ``"op in file:function"`` (no line numbers)."""
    detector = HostSyncDetector(device)
    windows = SyncWindows(detector, monkeypatch, cuda_errors=device == "cuda")
    with detector:
        train(compose_config(*SYNC_CHECK, *overrides), run_dir, [windows, *callbacks])
    found: dict[Any, list[str]] = {}
    for sync in detector.records:
        if sync.label is not None:
            caller = f"{Path(sync.caller.filename).name}:{sync.caller.name}"
            found.setdefault(sync.label, []).append(f"{sync.op} in {caller}")
    return found
