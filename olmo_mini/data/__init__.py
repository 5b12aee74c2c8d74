"""Corpora, tokenizer, token shards, streaming and the resumable ``OLMoDataModule``."""

from typing import TYPE_CHECKING

from olmo_mini._lazy import lazy_exports

if TYPE_CHECKING:
    from olmo_mini.data.config import DataConfig, padded_vocab_size
    from olmo_mini.data.datamodule import OLMoDataModule
    from olmo_mini.data.prepare import resolve_tokenizer_and_shards
    from olmo_mini.data.shards import read_manifest, write_shards
    from olmo_mini.data.tokenizer import eos_id, load_tokenizer, train_bpe

__all__ = [
    "DataConfig",
    "OLMoDataModule",
    "eos_id",
    "load_tokenizer",
    "padded_vocab_size",
    "read_manifest",
    "resolve_tokenizer_and_shards",
    "train_bpe",
    "write_shards",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "DataConfig": ".config",
        "padded_vocab_size": ".config",
        "OLMoDataModule": ".datamodule",
        "resolve_tokenizer_and_shards": ".prepare",
        "read_manifest": ".shards",
        "write_shards": ".shards",
        "eos_id": ".tokenizer",
        "load_tokenizer": ".tokenizer",
        "train_bpe": ".tokenizer",
    },
)
