"""Bad input to the model tools is one ``error:`` line naming what the user gave, exit status 1,
nothing written (issue 25, item 7): HF folders that do not load, undecodable prompts, overrides
evaluation does not take."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.interop.helpers import tool


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "hf"
    shutil.copytree(folder, copy)
    return copy


def _wider_mlp(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    return f"{folder}: weights do not fit the architecture its config gives: size mismatch for "


def _junk_header(folder: Path) -> str:
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    return f"{weights}: not a readable safetensors file ("


def _truncated(folder: Path) -> str:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return f"{weights}: not a readable safetensors file ("


def _extra_tensor(folder: Path) -> str:
    weights = folder / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "model.extra.weight": torch.zeros(2)}, weights)
    return f"{folder}: unexpected tensor 'model.extra.weight' in a Hugging Face Olmo2 checkpoint"


@pytest.mark.parametrize("damage", [_wider_mlp, _junk_header, _truncated, _extra_tensor])
def test_an_hf_folder_that_does_not_load_is_one_line(hf_folder, tmp_path, capsys, damage):
    source = _copy(hf_folder, tmp_path)
    expected = damage(source)
    out = tmp_path / "out"
    assert tool("convert_hf").main(["from-hf", str(source), str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {expected}"), captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert not out.exists()


def test_a_prompt_that_is_not_utf8_is_one_line(hf_folder, capsys):
    prompt = os.fsdecode(b"def \xff\xfe")  # how Python hands over such argv bytes
    assert tool("generate").main([str(hf_folder), "--prompt", prompt]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: --prompt b'def \\xff\\xfe': not UTF-8 text\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.val_batchs=2",
            "data.val_batchs: no such config key; did you mean data.val_batches",
        ),
        ("optim.lr=1", "optim.lr: evaluation takes data.* overrides only (the rest of the config"),
        ("data.val_batches", "'data.val_batches': expected KEY=VALUE, e.g. data.val_batches=8"),
    ],
)
def test_evaluate_overrides_are_data_keys_that_exist(single_run, capsys, override, message):
    assert tool("evaluate").main([str(single_run), override]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1
    assert captured.out == ""
