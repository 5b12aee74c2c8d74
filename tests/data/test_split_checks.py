"""Data that cannot feed the run is one ``DataError`` naming the setting, before training."""

from pathlib import Path

import pytest

from olmo_mini.data import DataConfig, OLMoDataModule
from olmo_mini.data.config import DataError

from .conftest import make_docs, write_jsonl


def _setup(files: list[str], tokenizer: Path, cache: Path, **kwargs) -> OLMoDataModule:
    config = DataConfig(
        source="files",
        files=files,
        tokenizer=str(tokenizer),
        cache_dir=str(cache),
        seq_len=16,
        micro_batch_size=2,
        **kwargs,
    )
    dm = OLMoDataModule(config, seed=0, rank=0, world_size=1)
    dm.setup()
    return dm


def test_a_few_documents_hold_out_nothing_at_the_default_fraction(tmp_path, tokenizer_path):
    files = [str(write_jsonl(tmp_path / f"{i}.jsonl", make_docs(1, seed=i))) for i in range(6)]
    with pytest.raises(DataError, match=r"data.val_fraction \(0.02\) holds out 0 sequences"):
        _setup(files, tokenizer_path, tmp_path / "cache", global_batch_size=2)
    dm = _setup(files, tokenizer_path, tmp_path / "cache", global_batch_size=2, val_fraction=0.5)
    assert len(dm.val_dataloader()) >= 1


def test_too_little_data_for_one_global_batch_names_the_batch_size(tmp_path, tokenizer_path):
    files = [str(write_jsonl(tmp_path / "docs.jsonl", make_docs(20)))]
    with pytest.raises(
        DataError, match=r"fewer than one global batch \(data.global_batch_size=512\)"
    ):
        _setup(files, tokenizer_path, tmp_path / "cache", global_batch_size=512, val_fraction=0.3)
