"""How well a model predicts text: loss, perplexity and bits per byte on a run's held-out split
(the batches the trainer validates on) or on whole documents of named files, scored as
lm-evaluation-harness's ``loglikelihood_rolling`` scores them. Models come from
``olmo_mini.interop.load``; ``tools/evaluate.py`` is the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders
from torch.nn.utils.rnn import pad_sequence

from olmo_mini.config import ConfigError, TrainConfig, load_config
from olmo_mini.data import DataConfig, OLMoDataModule
from olmo_mini.data.corpus import expand_files, file_documents
from olmo_mini.data.shards import encode_documents
from olmo_mini.data.tokenizer import tokenizer_hash
from olmo_mini.interop import Loaded
from olmo_mini.model import IGNORE_INDEX, OLMo2

# Data settings evaluation may override: they cut the same held-out token stream differently.
# Every other data.* setting picks the corpus, its held-out split or the token ids.
_EVAL_FREE_DATA_FIELDS = (
    "seq_len global_batch_size micro_batch_size val_batches num_workers prepare_procs cache_dir"
).split()


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per predicted token, nats
    perplexity: float
    bits_per_byte: float  # total CE / (ln 2 × UTF-8 bytes of the predicted text)
    tokens: int
    bytes: int
    batches: int
    context: int = 0  # the most tokens one prediction conditions on
    split: str = ""  # "held-out" (the run's validation windows) or "all" (whole documents)
    documents: int | None = None  # documents evaluated whole; None for held-out windows
    text: str = ""  # what was evaluated, in words
    tokenizer_hash: str = ""


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for; special tokens (EOS) stand for none.

    Exact for byte-level BPE (each character of a vocabulary entry is one byte); for other
    tokenizers, the length of the token decoded on its own.
    """
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if token not in special:
            lengths[i] = len(token) if byte_level else len(tokenizer.decode([i]).encode())
    return lengths


@torch.no_grad()
def evaluate_batches(
    model: OLMo2, batches: list[dict[str, torch.Tensor]], byte_lengths: np.ndarray, device: str
) -> EvalResult:
    """Loss, perplexity and bits per byte over ``batches``, in fp32 with the trainer's loss."""
    model = model.to(device).eval()
    lengths = torch.from_numpy(byte_lengths)
    total = 0.0
    tokens = n_bytes = 0
    for batch in batches:
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        count = int(mask.sum())
        ce = model(batch["input_ids"].to(device), labels=labels.to(device)).ce
        total += float(ce) * count
        tokens += count
        n_bytes += int(lengths[labels[mask]].sum())
    if tokens == 0:
        raise ValueError("nothing to evaluate: no token to predict")
    loss = total / tokens
    return EvalResult(
        loss, math.exp(loss), total / (math.log(2) * n_bytes), tokens, n_bytes, len(batches)
    )


def evaluate(loaded: Loaded, config: TrainConfig, device: str = "cpu") -> EvalResult:
    """Evaluate on the held-out batches the trainer validates on, for ``config``'s data.

    The trainer's ranks each take an equal number of whole micro-batches from the start of the
    held-out windows: with world size W those are the first ``n // W * W`` of the micro-batches
    one process would take, so the mean equals the logged ``val/loss`` (in a ``32-true`` run).
    """
    data = config.data
    datamodule = OLMoDataModule(data, config.seed, rank=0, world_size=1)
    datamodule.setup()
    found = tokenizer_hash(datamodule.tokenizer)
    if found != tokenizer_hash(loaded.tokenizer) or datamodule.eos_id != loaded.eos_id:
        raise ValueError(
            f"{datamodule.tokenizer_path}: tokenizer hash {found} with EOS id "
            f"{datamodule.eos_id}, but {loaded.path} was trained with hash "
            f"{tokenizer_hash(loaded.tokenizer)} and EOS id {loaded.eos_id}"
        )
    datamodule.check_vocab(loaded.model.config.vocab_size)
    batches = list(datamodule.val_dataloader())
    world = config.trainer.world_size
    batches = batches[: len(batches) // world * world]
    result = evaluate_batches(loaded.model, batches, token_byte_lengths(loaded.tokenizer), device)
    windows = sum(len(b["input_ids"]) for b in batches)
    text = (
        f"{windows} held-out windows of {data.seq_len + 1} tokens "
        f"(data.val_fraction={data.val_fraction}) of {_corpus(data)}"
    )
    return replace(result, context=data.seq_len, split="held-out", text=text, tokenizer_hash=found)


def _corpus(data: DataConfig) -> str:
    if data.source == "stdlib":
        return "the Python standard library's sources"
    if data.source == "files":
        return f"data.files={list(data.files)}"
    if data.source == "shards":
        return f"data.shards={data.shards}"
    return f"data.hf_path={data.hf_path}"


def eval_config(loaded: Loaded, overrides: list[str]) -> TrainConfig:
    """The run's config with ``key=value`` overrides that keep its held-out text and token ids
    (others would evaluate other text, or ids the weights did not learn: the default tokenizer is
    derived from data settings), reading the data with the tokenizer file the run recorded."""
    if loaded.config is None:
        raise ValueError(
            f"{loaded.path}: a model folder has no held-out split of its own; name the text to "
            "evaluate with --text FILE..."
        )
    for item in overrides:
        key, equals, _ = item.partition("=")
        if not equals:
            raise ConfigError(f"{item!r}: expected KEY=VALUE, e.g. data.val_batches=8")
        if not key.startswith("data."):
            raise ConfigError(
                f"{key}: evaluation takes data.* overrides only (the rest of the config is the "
                "run's, and would change nothing here)"
            )
    # Merged untyped, so that load_config names a misspelled key with its close matches.
    run = OmegaConf.to_container(OmegaConf.structured(loaded.config))
    config = load_config(OmegaConf.merge(run, OmegaConf.from_dotlist(overrides)))
    for name in (f.name for f in fields(DataConfig)):
        ours, runs = getattr(config.data, name), getattr(loaded.config.data, name)
        if name not in _EVAL_FREE_DATA_FIELDS and ours != runs:
            raise ConfigError(
                f"data.{name}={ours!r}: the run has {runs!r}; evaluation keeps the run's "
                "tokenizer, token ids and held-out split (overridable: data."
                f"{', data.'.join(_EVAL_FREE_DATA_FIELDS)}); evaluate other text whole with "
                "--text FILE..."
            )
    if loaded.tokenizer_dir is not None:
        config.data.tokenizer = str(loaded.tokenizer_dir)
    return config


def rolling_windows(
    stream: np.ndarray, lengths: np.ndarray, context: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(input_ids, labels)`` scoring every document of ``stream`` in windows of ``context``.

    ``stream`` is EOS followed by ``encode_documents``' output (each document then EOS), whose
    ``lengths`` count that EOS. As lm-eval's ``loglikelihood_rolling``: a document's tokens are
    predicted after the EOS before it, in disjoint spans of ``context`` tokens, each with as much
    of the document before it as fits (so the last is not short of context); the EOS after a
    document is not predicted. Labels already predicted by an earlier window are ignored.
    """
    windows = []
    start = 1
    for length in lengths.tolist():
        end_of_doc = start + length - 1
        for first in range(start, end_of_doc, context):
            stop = min(first + context, end_of_doc)
            lo = max(start - 1, stop - 1 - context)
            labels = stream[lo + 1 : stop].astype(np.int64)
            labels[: first - lo - 1] = IGNORE_INDEX
            windows.append((stream[lo : stop - 1].astype(np.int64), labels))
        start += length
    return windows


def evaluate_text(
    loaded: Loaded,
    files: list[str],
    context: int | None = None,
    text_field: str = "text",
    device: str = "cpu",
    batch_size: int = 8,
) -> EvalResult:
    """Every document of ``files`` (a ``.txt`` file, a ``.jsonl`` line, a ``.parquet`` row), whole.

    Scored as :func:`rolling_windows` says, with ``context`` defaulting to the length the run
    trained at (a model folder: its ``max_seq_len``). The total loss is minus the sum of
    lm-eval's rolling loglikelihoods and ``bits_per_byte`` its ``bits_per_byte``.
    """
    if loaded.eos_id is None:
        raise ValueError(f"{loaded.path}: its tokenizer has no EOS token to start documents after")
    max_len = loaded.model.config.max_seq_len
    if context is None:
        context = loaded.config.data.seq_len if loaded.config is not None else max_len
    if not 1 <= context <= max_len:
        raise ValueError(
            f"--context {context}: must be between 1 and the model's max_seq_len ({max_len})"
        )
    paths = expand_files(files)
    documents = [text for _, text in file_documents(paths, text_field)]
    flat, lengths = encode_documents(loaded.tokenizer, documents, loaded.eos_id)
    stream = np.concatenate([[loaded.eos_id], flat])
    windows = rolling_windows(stream, lengths, context)
    batches = [
        _padded(windows[i : i + batch_size], loaded.eos_id)
        for i in range(0, len(windows), batch_size)
    ]
    result = evaluate_batches(loaded.model, batches, token_byte_lengths(loaded.tokenizer), device)
    return replace(
        result,
        context=context,
        split="all",
        documents=len(documents),
        text=f"every document of {', '.join(map(str, paths))}",
        tokenizer_hash=tokenizer_hash(loaded.tokenizer),
    )


def _padded(windows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch, right-padded: a causal model's earlier positions never see the padding."""
    ids = [torch.from_numpy(window) for window, _ in windows]
    labels = [torch.from_numpy(targets) for _, targets in windows]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
    }
