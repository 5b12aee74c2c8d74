"""What every benchmark shares: device sync and timing, memory peaks, the machine's name and load,
one trainer-timing callback with the "quiet run" overrides it times, and result output (JSON
lines of typed rows, markdown tables, CSV)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import lightning as L
import torch

from olmo_mini.config import TrainConfig
from olmo_mini.stepping import StepCallback
from olmo_mini.training import train


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock reading comes after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, its queued device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages: other processes' share of the cores."""
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def device_name(device: torch.device) -> str:
    """What a result was measured on: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "cpu"


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key} (peak RSS needs Linux)")


def reset_peak(device: torch.device) -> int:
    """Restart the device's memory peak; returns the memory in use now (allocated on a GPU,
    resident on a CPU: Linux's ``clear_refs``), the base for :func:`peak_bytes`."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def peak_bytes(device: torch.device) -> int:
    """The peak since :func:`reset_peak` or the start: allocated on a GPU, resident on a CPU."""
    sync(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def rss_bytes() -> int:
    """This process's resident memory now."""
    return _proc_status_bytes("VmRSS")


def quiet_run(steps: int, overrides: Sequence[str] = ()) -> list[str]:
    """``train.py`` overrides that leave only ``steps`` training steps to time: no validation
    within them and ``debug=quiet`` (no sample, checkpoint, progress bar or logger), unless
    ``overrides`` choose a ``debug`` option themselves (each includes ``quiet``)."""
    debug = [] if any(o.startswith("debug=") for o in overrides) else ["debug=quiet"]
    return [*debug, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps + 1}"]


class StepTimes(StepCallback):
    """Seconds of each optimizer step, from the previous one's end: data loading and Lightning's
    loop included, the first step (which has no such start) left out. ``between`` runs after
    every step, outside the timing (an interleaved model-level step: noise hits both alike)."""

    def __init__(self, between: Callable[[], object] = lambda: None) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self.between = between
        self._resumed: float | None = None  # when the step being timed started

    def post_optim_step(self, trainer: L.Trainer, module: L.LightningModule, step: int) -> None:
        sync(module.device)
        if self._resumed is not None:
            self.seconds.append(time.perf_counter() - self._resumed)
        self.between()
        self._resumed = time.perf_counter()


def time_trainer(config: TrainConfig, between: Callable[[], object] = lambda: None) -> list[float]:
    """Seconds of each step (see :class:`StepTimes`) of ``python train.py`` with ``config``,
    run in this process in a throwaway run directory."""
    timer = StepTimes(between)
    with tempfile.TemporaryDirectory() as run_dir:
        train(config, Path(run_dir), callbacks=[timer])
    return timer.seconds


def parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a benchmark, described by its module docstring's first line."""
    return argparse.ArgumentParser(description=doc.strip().splitlines()[0])


def json_line(result: object) -> str:
    """A result dataclass as one JSON line; fields that do not apply (None) are left out."""
    present = dataclasses.asdict(  # type: ignore[call-overload]
        result, dict_factory=lambda items: {k: v for k, v in items if v is not None}
    )
    return json.dumps(present)


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], numeric: int = 0
) -> str:
    """A markdown table whose last ``numeric`` columns are right-aligned."""
    rule = "|" + "|".join(["---"] * (len(header) - numeric) + ["---:"] * numeric) + "|"
    lines = ["| " + " | ".join(map(str, row)) + " |" for row in [header, *rows]]
    return "\n".join([lines[0], rule, *lines[1:]])


def write_csv(rows: Sequence[object], path: Path) -> None:
    """Result dataclasses, one a line, under a header of their field names."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(field.name for field in dataclasses.fields(rows[0]))  # type: ignore[arg-type]
        writer.writerows(dataclasses.astuple(row) for row in rows)  # type: ignore[call-overload]
