from pathlib import Path

import pytest

from olmo_mini.data import eos_id, load_tokenizer, train_bpe
from olmo_mini.data.tokenizer import EOS_TOKEN, tokenizer_hash

from .conftest import make_docs


def test_training_is_reproducible() -> None:
    docs = make_docs(100, seed=3)
    first, second = train_bpe(docs, 320), train_bpe(iter(docs), 320)
    assert first.to_str() == second.to_str()
    assert tokenizer_hash(first) == tokenizer_hash(second)
    assert first.get_vocab_size() == 320
    assert eos_id(first) == first.token_to_id(EOS_TOKEN) == 0


def test_byte_level_round_trip(tokenizer_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    text = "def f(x):\n    return 'ünïcode ✓'\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_hf_folder_and_eos_from_config(tmp_path: Path, tokenizer_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "a"}}')
    loaded = load_tokenizer(tmp_path)
    assert eos_id(loaded, path=tmp_path) == loaded.token_to_id("a") != 0


def test_bad_tokenizer_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)
