"""Byte-level BPE training, loading any ``tokenizer.json``/HF folder, EOS lookup and hashing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from olmo_mini.data.cache import build_once, cache_root, content_key
from olmo_mini.data.corpus import is_val, stdlib_documents, stdlib_hash

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, no unknown bytes) with ``<|endoftext|>`` as id 0.

    Training is deterministic for a given corpus order and ``tokenizers`` version, which is
    what makes the cached default tokenizer reproducible.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` named by a file or HF tokenizer folder; missing → error naming it."""
    path = Path(path).expanduser()
    candidate = path / "tokenizer.json" if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(f"tokenizer not found: {candidate}")
    return candidate


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer; a file that does not parse is an error naming it."""
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"cannot load tokenizer {file}: {e}") from None


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Identity of a tokenizer's behaviour, recorded in shard manifests and resume fingerprints."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def eos_id(
    tokenizer: Tokenizer, eos_token: str | None = None, path: str | Path | None = None
) -> int:
    """The id that ends every document.

    ``eos_token`` if given; else an HF folder's ``tokenizer_config.json`` ``eos_token``; else the
    first of the usual names the vocabulary has.
    """
    where = f" in tokenizer {path}" if path else ""
    if eos_token is None and path is not None:
        config = Path(path).expanduser() / "tokenizer_config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("eos_token")
            eos_token = value.get("content") if isinstance(value, dict) else value
    names = (eos_token,) if eos_token else EOS_CANDIDATES
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    raise ValueError(f"no EOS token{where}: tried {names}; set data.eos_token")


def default_tokenizer(
    vocab_size: int, cache_dir: str | None, val_fraction: float, max_docs: int | None = None
) -> Path:
    """The stdlib-trained BPE, trained on first use and cached under a content key.

    Trained on the stdlib's training split only, so validation text never shapes the merges.
    """
    key = content_key(
        {
            "kind": "stdlib-bpe",
            "corpus": stdlib_hash(max_docs),
            "vocab_size": vocab_size,
            "val_fraction": val_fraction,
            "tokenizers": tokenizers.__version__,
        }
    )
    target = cache_root(cache_dir) / "tokenizers" / f"stdlib-{vocab_size}-{key}"

    def build(tmp: Path) -> None:
        texts = (t for k, t in stdlib_documents(max_docs) if not is_val(k, val_fraction))
        train_bpe(texts, vocab_size).save(str(tmp / "tokenizer.json"))

    return build_once(target, build) / "tokenizer.json"
