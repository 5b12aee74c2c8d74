"""Checkpoints ↔ Hugging Face, model.init_from, the generate/evaluate tools, bits per byte."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
)

from olmo_mini.config import ConfigError
from olmo_mini.data import OLMoDataModule, train_bpe
from olmo_mini.evaluation import evaluate_batches, token_byte_lengths
from olmo_mini.interop import export_hf, load, load_init_weights, load_model
from olmo_mini.model import OLMo2, OLMo2Config
from olmo_mini.model.generation import generate
from olmo_mini.run_dir import COMPLETE
from olmo_mini.training import train
from olmo_mini.training.parallel import build_model
from tests.interop.helpers import tool as _tool
from tests.training.helpers import REPO, compose_config, series

TEXT = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("run", ["single_run", pytest.param("fsdp_run", marks=pytest.mark.slow)])
def test_checkpoint_to_hf_gives_same_logits_tokens_and_greedy_text(run, request, tmp_path):
    run_dir = request.getfixturevalue(run)
    ours = load(run_dir)
    out = export_hf(run_dir, tmp_path / "hf")

    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = hf_tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.tokenizer.encode(TEXT).ids
    assert hf_tokenizer.eos_token_id == hf_tokenizer.pad_token_id == ours.eos_id
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours.model(ids), rtol=1e-4, atol=1e-4)
    theirs = hf_model.generate(ids, max_new_tokens=8, do_sample=False)
    mine = generate(ours.model, ids, 8, temperature=0)
    assert torch.equal(theirs, mine)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == ours.eos_id


@pytest.mark.slow
def test_to_hf_cli_writes_bf16_and_names_bad_sources(fsdp_run, tmp_path, capsys):
    step = fsdp_run / "checkpoints" / "step_2"
    result = subprocess.run(
        [
            sys.executable,
            "tools/convert_hf.py",
            "to-hf",
            str(step),
            str(tmp_path / "bf16"),
            "--dtype",
            "bf16",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'bf16'} (") and "MB: config.json" in (
        result.stdout
    )
    assert result.stdout.rstrip().endswith(f"): bf16 weights from {step}")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}

    assert _tool("convert_hf").main(["to-hf", str(tmp_path / "nope"), str(tmp_path / "x")]) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_bad_sources_are_errors_naming_the_file(single_run, tmp_path):
    incomplete = tmp_path / "step_9"
    shutil.copytree(single_run / "checkpoints" / "step_2", incomplete)
    (incomplete / COMPLETE).unlink()
    with pytest.raises(ValueError, match=f"{incomplete / COMPLETE} is missing"):
        load_model(incomplete)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete step_<N>"):
        load_model(tmp_path / "run")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=f"{llama / 'config.json'}: not a convertible .*'llama'"):
        load_model(llama)


def test_hf_to_olmo_mini_gives_same_logits(hf_folder, tmp_path, capsys):
    out = tmp_path / "init"
    assert _tool("convert_hf").main(["from-hf", str(hf_folder), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"model.init_from={out}" in printed and "model.d_model=64" in printed
    assert (out / "tokenizer.json").is_file()

    hf_model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    ids = torch.tensor([load(out).tokenizer.encode(TEXT).ids])
    with torch.no_grad():
        expected = hf_model(ids).logits
        torch.testing.assert_close(load_model(out)(ids), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_model(hf_folder)(ids), expected, rtol=1e-4, atol=1e-4)


def test_from_hf_without_tokenizer_files_prints_a_command_that_runs(hf_folder, tmp_path, capsys):
    """OLMo-core writes no tokenizer: the printed command must not name one in the folder."""
    bare = tmp_path / "olmo_core"
    shutil.copytree(hf_folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    out = tmp_path / "init"
    assert _tool("convert_hf").main(["from-hf", str(bare), str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote {out} (") and printed[0].endswith(
        "MB: config.json, generation_config.json, model.safetensors)"
    )
    assert printed[1].startswith(f"{bare} has no tokenizer files")
    command = printed[-1].split()
    assert command[:2] == ["python", "train.py"] and "data.tokenizer" not in printed[-1]
    result = subprocess.run(
        [sys.executable, *command[1:], "debug=smoke", "trainer.max_steps=1", "trainer.val_check_interval=1",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def _assert_same_weights(model: OLMo2, expected: OLMo2) -> None:
    for (name, a), b in zip(
        model.state_dict().items(), expected.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_sharded_hf_folders_load_whole_and_as_init_weights(hf_folder, tmp_path):
    sharded = tmp_path / "sharded"
    hf_model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    hf_model.save_pretrained(sharded, max_shard_size="300KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    expected = load_model(hf_folder)
    _assert_same_weights(OLMo2.from_hf(sharded), expected)
    fresh = OLMo2(expected.config)
    fresh.init_weights(seed=1)
    load_init_weights(fresh, str(sharded))
    _assert_same_weights(fresh, expected)


def test_old_weights_folders_still_load_with_a_deprecation_warning(hf_folder, tmp_path, caplog):
    """What ``convert_hf.py from-hf`` wrote before it wrote HF folders: olmo-mini names."""
    old = tmp_path / "old"
    old.mkdir()
    expected = load_model(hf_folder)
    weights = {k: v.contiguous() for k, v in expected.state_dict().items()}
    save_file(weights, old / "model.safetensors")
    (old / "model.yaml").write_text(OmegaConf.to_yaml(expected.config.to_dict()))
    with caplog.at_level(logging.WARNING, logger="olmo_mini.interop"):
        _assert_same_weights(load_model(old), expected)
    assert len(caplog.records) == 1 and "deprecated" in caplog.records[0].getMessage()
    fresh = OLMo2(expected.config)
    fresh.init_weights(seed=1)
    load_init_weights(fresh, str(old))
    _assert_same_weights(fresh, expected)


def test_init_from_starts_the_run_from_those_weights(hf_folder, tmp_path):
    config = compose_config(
        "debug=smoke",
        "trainer.max_steps=1",
        "stability.enabled=false",
        f"model.init_from={hf_folder}",
    )
    train(config, tmp_path)
    step1 = series(tmp_path, "train/ce_loss")[1]

    datamodule = OLMoDataModule(config.data, config.seed, rank=0, world_size=1)
    datamodule.setup()
    micro_batches = iter(datamodule.train_dataloader())
    source = load_model(hf_folder)
    with torch.no_grad():
        losses = [
            source(b["input_ids"], labels=b["labels"]).ce
            for b in (next(micro_batches) for _ in range(config.grad_accum_steps))
        ]
    assert step1 == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)


def test_init_from_with_another_architecture_names_the_option(hf_folder):
    config = compose_config("debug=smoke", "model.d_model=32", f"model.init_from={hf_folder}")
    with pytest.raises(
        ConfigError, match=r"model.init_from: .*model.d_model=32 but the source has 64"
    ):
        build_model(config.model, 0, config.trainer, "32-true")
    with pytest.raises(ConfigError, match="model.init_from: '/no/such' does not exist"):
        compose_config("debug=smoke", "model.init_from=/no/such")


@pytest.mark.slow
def test_generate_cli_is_seeded_and_cache_equals_no_cache(fsdp_run, capsys):
    tool = _tool("generate")

    def sample(*extra: str) -> str:
        args = [
            str(fsdp_run),
            "--prompt",
            "def ",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.0",
            "--top-k",
            "100",
            "--top-p",
            "0.95",
            *extra,
        ]
        assert tool.main(args) == 0
        return capsys.readouterr().out

    first = sample("--seed", "3")
    assert first.startswith("def ") and len(first) > 5
    assert sample("--seed", "3", "--no-cache") == first
    assert sample("--seed", "3") == first
    assert sample("--seed", "4") != first


@pytest.mark.parametrize("run", ["single_run", pytest.param("fsdp_run", marks=pytest.mark.slow)])
def test_evaluate_equals_the_trainers_val_loss(run, request, capsys):
    run_dir = request.getfixturevalue(run)
    assert _tool("evaluate").main([str(run_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(series(run_dir, "val/loss")[2], rel=1e-5)
    assert result["tokens"] == 8 * 64 and result["batches"] == 4  # data.val_batches × global batch
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    bpb = result["loss"] * result["tokens"] / (math.log(2) * result["bytes"])
    assert result["bits_per_byte"] == pytest.approx(bpb)


def test_bits_per_byte_on_a_hand_checkable_example():
    tokenizer = train_bpe(["héllo wörld, hello world"] * 20, vocab_size=300)
    lengths = token_byte_lengths(tokenizer)
    text = "héllo wörld"  # 11 characters, 13 UTF-8 bytes (é and ö take two)
    ids = tokenizer.encode(text).ids + [tokenizer.token_to_id("<|endoftext|>")]
    assert lengths[ids].sum() == 13 and lengths[ids[-1]] == 0
    # A zero LM head gives uniform logits: each token costs ln 512 nats = 9 bits.
    model = OLMo2(
        OLMo2Config(
            vocab_size=512, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64, max_seq_len=32
        )
    )
    torch.nn.init.zeros_(model.lm_head.weight)
    windows = torch.tensor([[ids[0], *ids]])
    batch = {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}
    result = evaluate_batches(model, [batch], lengths, "cpu")
    n = len(ids)
    assert (result.tokens, result.bytes) == (n, 13)
    assert result.loss == pytest.approx(math.log(512))
    assert result.perplexity == pytest.approx(512)
    assert result.bits_per_byte == pytest.approx(n * 9 / 13)
