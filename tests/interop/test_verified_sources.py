"""The tools verify every checkpoint they read exactly as ``resume=auto`` does (issue 25, item 4):
a damaged step stops them with one line, a run dir gives its newest checkpoint that verifies."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from olmo_mini.interop import load
from olmo_mini.run_dir import CONFIG_FILE, STATE_FILE
from tests.interop.helpers import tool

CORRUPTED = f"{STATE_FILE} does not match its digest in COMPLETE (corrupted)"


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(data)


def test_tools_read_only_checkpoints_that_verify(single_run, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(single_run, run, ignore=shutil.ignore_patterns("csv"))
    newest, older = run / "checkpoints" / "step_2", run / "checkpoints" / "step_1"
    shutil.copytree(newest, older)
    _flip_a_bit(newest / STATE_FILE)

    out = tmp_path / "hf"
    for name, argv in [
        ("convert_hf", ["to-hf", str(newest), str(out)]),
        ("evaluate", [str(newest)]),
        ("generate", [str(newest), "--max-new-tokens", "2"]),
    ]:
        assert tool(name).main(argv) == 1, name
        captured = capsys.readouterr()
        assert captured.err == f"error: {newest}: not a usable checkpoint: {CORRUPTED}\n", name
        assert captured.out == ""
    assert not out.exists()

    with caplog.at_level(logging.WARNING):
        assert load(run).path == older
    assert f"skipping {newest}: {CORRUPTED}" in caplog.messages

    # A hand-edited config inside a checkpoint is not the one its weights were trained with.
    config = older / CONFIG_FILE
    size = config.stat().st_size
    config.write_text(config.read_text().replace("norm_type: rms", "norm_type: layer"))
    assert tool("evaluate").main([str(run)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {run / 'checkpoints'}: no checkpoint verifies (step_2: {CORRUPTED}; "
        f"step_1: {CONFIG_FILE} has {size + 2} bytes, its marker says {size})"
    )
