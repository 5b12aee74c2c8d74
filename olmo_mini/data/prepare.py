"""What a ``DataConfig`` reads: its tokenizer file and token shards, built into the cache on
first use. Lightning-free, so that the tools find a run's data exactly as its DataModule did."""

from __future__ import annotations

from pathlib import Path

from olmo_mini.data.cache import build_once, cache_root, content_key
from olmo_mini.data.config import DataConfig
from olmo_mini.data.corpus import (
    expand_files,
    file_documents,
    files_hash,
    stdlib_documents,
    stdlib_hash,
)
from olmo_mini.data.shards import FORMAT, write_shards
from olmo_mini.data.tokenizer import (
    default_tokenizer,
    eos_id,
    load_tokenizer,
    tokenizer_file,
    tokenizer_hash,
)


def resolve_tokenizer_and_shards(config: DataConfig) -> tuple[str, str | None]:
    """``(tokenizer path or URL, shard root or None for streaming)``, building caches."""
    if config.source == "files":
        expand_files(config.files)  # a missing file fails before any tokenizer is trained
    if config.tokenizer is not None:
        tokenizer = str(tokenizer_file(config.tokenizer))
    elif config.source == "shards":
        tokenizer = f"{str(config.shards).rstrip('/')}/tokenizer.json"
    else:
        # A stdlib subset (max_docs, for quick runs) also trains the tokenizer on the subset.
        subset = config.max_docs if config.source == "stdlib" else None
        tokenizer = str(
            default_tokenizer(config.vocab_size, config.cache_dir, config.val_fraction, subset)
        )
    if config.source in ("stdlib", "files"):
        return tokenizer, str(prepared_corpus(config, Path(tokenizer)))
    return tokenizer, config.shards


def prepared_corpus(config: DataConfig, tokenizer_path: Path) -> Path:
    """Shards of the stdlib or local-files corpus, tokenized on first use and cached by content."""
    tokenizer = load_tokenizer(tokenizer_path)
    eos = eos_id(tokenizer, config.eos_token, tokenizer_path)
    if config.source == "stdlib":
        corpus, kind = stdlib_hash(config.max_docs), "stdlib"
        documents = stdlib_documents(config.max_docs)
    else:
        paths = expand_files(config.files)
        corpus, kind = files_hash(paths, config.text_field, config.max_docs), "files"
        documents = file_documents(paths, config.text_field, config.max_docs)
    made_of = {"format": FORMAT, "corpus": corpus, "eos": eos, "val_fraction": config.val_fraction}
    key = content_key({**made_of, "tokenizer": tokenizer_hash(tokenizer)})
    target = cache_root(config.cache_dir) / "shards" / f"{kind}-{key}"
    options = {"val_fraction": config.val_fraction, "procs": config.prepare_procs}

    def build(tmp: Path) -> None:
        write_shards(documents, tokenizer, eos, tmp, source=f"{kind}:{corpus}", **options)

    return build_once(target, build)
