"""Evaluation you can trust: the run's own tokenizer, whole files, folders shaped like peers'."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from olmo_mini.data import resolve_tokenizer_and_shards, train_bpe
from olmo_mini.data.tokenizer import tokenizer_hash
from olmo_mini.evaluation import rolling_windows
from olmo_mini.interop import export_hf, load, load_model, trained_tokenizer_hash
from olmo_mini.model import IGNORE_INDEX, OLMo2, OLMo2Config
from olmo_mini.model.hf import DEFAULT_CONTEXT
from tests.interop.helpers import tool

DOCS = [f"def f{i}(x):\n    return x + {i}\n" for i in range(20)]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _evaluate(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict | str]:
    code = tool("evaluate").main(list(args))
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else err


# ---------------------------------------------------------------- one tokenizer per run


def test_the_run_records_the_tokenizer_it_trained_with(single_run):
    config = load(single_run).config
    path, _ = resolve_tokenizer_and_shards(config.data)
    assert (single_run / "tokenizer.json").read_bytes() == Path(path).read_bytes()
    assert json.loads((single_run / "tokenizer_config.json").read_text()) == {
        "eos_token": "<|endoftext|>"
    }


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["data.val_fraction=0.9"], "data.val_fraction"),  # used to train and use another BPE
        (["data.vocab_size=512"], "data.vocab_size"),
        (["data.eos_token=def"], "data.eos_token"),
        (["data.max_docs=40"], "data.max_docs"),
        (["data.tokenizer=OTHER"], "data.tokenizer"),
        (["data.source=files", "data.files=[DOCS]"], "data.source"),  # used to take 2% of DOCS
    ],
)
def test_overrides_that_change_tokens_or_text_are_errors(
    single_run, overrides, named, tmp_path, capsys
):
    other = tmp_path / "other.json"
    train_bpe(DOCS, vocab_size=300).save(str(other))
    docs = _jsonl(tmp_path / "docs.jsonl", DOCS)
    args = [o.replace("OTHER", str(other)).replace("DOCS", str(docs)) for o in overrides]
    code, err = _evaluate(capsys, str(single_run), *args)
    assert code == 1 and err.startswith(f"error: {named}=") and "--text" in err


def test_overrides_may_change_how_many_held_out_windows_and_their_length(single_run, capsys):
    code, result = _evaluate(capsys, str(single_run), "data.val_batches=2", "data.seq_len=32")
    assert code == 0 and (result["tokens"], result["context"]) == (2 * 8 * 32, 32)


@pytest.mark.parametrize(
    "run",
    ["single_run", pytest.param("fsdp_run", marks=pytest.mark.slow)],  # meta.pt: 2 processes
)
def test_no_tool_pairs_a_checkpoint_with_another_tokenizer(run, request, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(run), copy)
    trained = trained_tokenizer_hash(copy / "checkpoints" / "step_2")
    assert trained == tokenizer_hash(load(copy).tokenizer)

    train_bpe(DOCS, vocab_size=300).save(str(copy / "tokenizer.json"))
    with pytest.raises(
        ValueError, match=f"tokenizer hash .* trained with tokenizer hash {trained}"
    ):
        load(copy)
    docs = str(_jsonl(tmp_path / "docs.jsonl", DOCS))
    calls = {
        "evaluate": [str(copy)],
        "generate": [str(copy), "--prompt", "def "],
        "convert_hf": ["to-hf", str(copy), str(tmp_path / "hf")],
    }
    for name, args in [*calls.items(), ("evaluate", [str(copy), "--text", docs])]:
        assert tool(name).main(args) == 1
        assert f"{copy / 'tokenizer.json'}: tokenizer hash" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_run_that_recorded_no_tokenizer_uses_its_configs_checked(single_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(single_run, copy)
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer_config.json").unlink()
    loaded = load(copy)
    assert loaded.tokenizer_dir is None
    assert tokenizer_hash(loaded.tokenizer) == trained_tokenizer_hash(
        copy / "checkpoints" / "step_2"
    )


# ---------------------------------------------------------------- evaluating named text whole


def test_rolling_windows_by_hand():
    eos = 0
    stream = np.array([eos, 1, 2, 3, 4, 5, eos, 6, eos])  # documents [1..5] and [6]
    windows = rolling_windows(stream, np.array([6, 2]), context=2)
    got = [(ids.tolist(), labels.tolist()) for ids, labels in windows]
    assert got == [
        ([eos, 1], [1, 2]),
        ([2, 3], [3, 4]),
        ([3, 4], [IGNORE_INDEX, 5]),  # the last span keeps a full context
        ([eos], [6]),  # a document never sees the one before it; no EOS is predicted
    ]


def test_text_scores_every_document_of_a_small_file(single_run, tmp_path, capsys):
    # The held-out split of these 20 documents is empty: data.files=[...] evaluated nothing.
    docs = _jsonl(tmp_path / "docs.jsonl", DOCS)
    code, result = _evaluate(capsys, str(single_run), "--text", str(docs))
    assert code == 0, result
    loaded = load(single_run)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for text in DOCS:  # each is shorter than the context: one window after an EOS
            ids = torch.tensor([[loaded.eos_id, *loaded.tokenizer.encode(text).ids]])
            logits = loaded.model(ids[:, :-1])
            total += float(
                torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum")
            )
            tokens += ids.shape[1] - 1
    assert (result["split"], result["documents"], result["tokens"]) == ("all", 20, tokens)
    assert result["bytes"] == sum(len(t.encode()) for t in DOCS)
    assert result["context"] == loaded.config.data.seq_len
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert str(docs) in result["text"]


def test_a_model_folder_evaluates_named_text_without_building_a_corpus(
    single_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("OLMO_MINI_CACHE", str(tmp_path / "cache"))
    folder = export_hf(single_run, tmp_path / "hf")
    code, err = _evaluate(capsys, str(folder))
    assert code == 1 and "no held-out split of its own" in err and "--text" in err

    docs = str(_jsonl(tmp_path / "docs.jsonl", [DOCS[0] * 12, *DOCS[1:4]]))
    code, exported = _evaluate(capsys, str(folder), "--text", docs, "--context", "64")
    assert code == 0, exported
    code, run = _evaluate(capsys, str(single_run), "--text", docs)
    assert code == 0, run
    assert exported["context"] == run["context"] == 64 and exported["tokens"] == run["tokens"]
    assert exported["tokenizer_hash"] == run["tokenizer_hash"]
    assert exported["loss"] == pytest.approx(run["loss"], rel=1e-6)
    assert not (tmp_path / "cache").exists()  # nothing was tokenized into a cache


# ---------------------------------------------------------------- folders peers write and read


def test_save_hf_writes_generation_config_and_readable_weights(tmp_path):
    model = OLMo2(
        OLMo2Config(
            vocab_size=256, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64, max_seq_len=64
        )
    )
    model.save_hf(tmp_path, special_tokens={"eos_token_id": 3, "pad_token_id": 3})
    generation = GenerationConfig.from_pretrained(tmp_path)
    assert (generation.eos_token_id, generation.pad_token_id, generation.bos_token_id) == (
        3,
        3,
        None,
    )
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]


@pytest.mark.parametrize("context", [-1, None, "absent"])
def test_from_hf_takes_a_stated_default_where_peers_give_no_context(
    context, hf_folder, tmp_path, caplog
):
    # OLMo-core's save_hf_model writes max_position_embeddings=-1 (transformers loads that).
    folder = tmp_path / "peer"
    shutil.copytree(hf_folder, folder)
    config_file = folder / "config.json"
    written = json.loads(config_file.read_text())
    if context == "absent":
        del written["max_position_embeddings"]
    else:
        written["max_position_embeddings"] = context
    config_file.write_text(json.dumps(written))

    with caplog.at_level(logging.WARNING, logger="olmo_mini.model.hf"):
        ours = OLMo2.from_hf(folder)
        assert load_model(folder).config.max_seq_len == DEFAULT_CONTEXT  # read again: no repeat
    assert ours.config.max_seq_len == DEFAULT_CONTEXT
    said = f"max_position_embeddings is {context if context != 'absent' else None!r}"
    assert caplog.text.count(said) == 1 and f"{config_file}: " in caplog.text
    ids = torch.arange(1, 40).unsqueeze(0)
    theirs = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
