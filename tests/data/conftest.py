"""Tiny corpora and tokenizers written under tmp paths, so data tests take seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from olmo_mini.data import train_bpe
from olmo_mini.data.corpus import file_documents
from olmo_mini.data.shards import write_shards

WORDS = (
    "alpha beta gamma delta epsilon zeta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega import def class return yield lambda"
).split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(make_docs(200, seed=1), vocab_size=300).save(str(path))
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", make_docs(300))


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path, tokenizer_path: Path) -> Path:
    from olmo_mini.data import load_tokenizer

    out = tmp_path_factory.mktemp("shards")
    tokenizer = load_tokenizer(tokenizer_path)
    write_shards(
        file_documents([corpus]),
        tokenizer,
        0,
        out,
        source=str(corpus),
        val_fraction=0.1,
        procs=1,
        shard_tokens=4000,
    )
    return out
