"""A damaged token shard is one ``error:`` line naming it, in the main process and in loader
workers; one found before training leaves no run dir (issue 25, item 7)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from olmo_mini.data.config import DataError
from tests.training.helpers import REPO, train_command

SHARD = "train-00001.bin"


def _train(run_dir: Path, *overrides: str) -> tuple[int, str]:
    done = subprocess.run(
        train_command(run_dir, "debug=smoke", *overrides),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stderr


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(data)


@pytest.mark.parametrize(
    "damage, message, workers",
    [
        (Path.unlink, "data.shards: shard not found: {shard}", 0),
        (_truncate, "data.shards: truncated or corrupt shard {shard}: 100 bytes, but the", 0),
        (_flip_a_byte, "corrupt shard {shard}: its digest (XXH3-128) does not match", 2),
    ],
)
def test_a_damaged_shard_is_one_line(shard_dir, tmp_path, damage, message, workers):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    damage(shards / SHARD)
    run_dir = tmp_path / "run"
    data = ["data=shards", f"data.shards={shards}", "model.vocab_size=300", "trainer.max_steps=2"]
    rc, err = _train(run_dir, *data, f"data.num_workers={workers}")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 1 and errors == [err.splitlines()[-1]], err
    assert errors[0].startswith("error: " + message.format(shard=shards / SHARD)), err
    assert "Traceback" not in err
    if workers == 0:  # found before the run dir is written
        assert not run_dir.exists()


def test_shard_errors_in_loader_workers_keep_their_message():
    wrapped = (
        "Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nolmo_mini.data.config.DataError: corrupt '
        "shard s/train-00001.bin: its digest does not match\n"
    )
    assert str(DataError(wrapped)) == "corrupt shard s/train-00001.bin: its digest does not match"
    assert str(DataError("data.shards: as raised")) == "data.shards: as raised"
