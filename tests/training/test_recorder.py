"""The one metrics path: device values held per step, reduced over ranks, moved to the host in
one transfer, hooked by callbacks, logged once per step; nothing else writes to loggers."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olmo_mini.training.recorder import MetricRecorder

PACKAGE = Path(__file__).resolve().parents[2] / "olmo_mini"


class ListLogger:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []
        self.saves = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((step, dict(metrics)))

    def save(self) -> None:
        self.saves += 1


class AddDouble:
    def pre_log_metrics(self, rows: dict[int, dict[str, float]]) -> None:
        for row in rows.values():
            row["double"] = 2 * row["a"]


def test_flush_moves_everything_in_one_transfer_and_logs_each_step_once(monkeypatch):
    recorder = MetricRecorder()
    recorder.record(2, "a", torch.tensor(3.0))
    recorder.record(1, "a", torch.tensor([1.5]))  # any single-element tensor
    recorder.record(1, "lr", 0.25)
    transfers = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: transfers.append(t) or original(t))
    logger = ListLogger()
    rows = recorder.flush([logger], [AddDouble()])
    assert len(transfers) == 1
    assert logger.calls == [
        (1, {"a": 1.5, "lr": 0.25, "double": 3.0}),
        (2, {"a": 3.0, "double": 6.0}),
    ]
    assert rows == dict(logger.calls) and logger.saves == 1
    assert recorder.flush([logger], [AddDouble()]) == {} and len(logger.calls) == 2


def _reduce_on_rank(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    recorder = MetricRecorder()
    value = torch.tensor(float(rank + 1))  # 1 on rank 0, 2 on rank 1
    for reduce in ("mean", "sum", "max", None):
        recorder.record(7, f"x/{reduce}", value, reduce)
    out[rank] = recorder.flush([], [])[7]
    dist.destroy_process_group()


def test_values_are_reduced_over_ranks_by_their_reduction(tmp_path):
    out = mp.Manager().dict()
    mp.start_processes(
        _reduce_on_rank, (str(tmp_path / "init"), out), nprocs=2, start_method="fork"
    )
    for rank in (0, 1):
        assert out[rank] == {"x/mean": 1.5, "x/sum": 3.0, "x/max": 2.0, "x/None": rank + 1.0}


def test_nothing_but_the_recorder_writes_to_loggers():
    writes = re.compile(
        r"\.log_metrics\(|\.log_hyperparams\(|\bself\.log\(|\.log_dict\(|wandb\.log\("
    )
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "recorder.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if writes.search(line.split("#")[0])
    ]
    assert offenders == []
