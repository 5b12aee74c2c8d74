"""Hugging Face ``datasets`` streaming: documents tokenized inside the loader workers and packed.

For corpora too large to prepare. The document stream is split over ``world_size × num_workers``
slots with ``datasets.distributed.split_dataset_by_node`` (whole files when their count divides,
else every n-th document); slot ``rank·W + v`` packs its documents (each + EOS) into windows of
``seq_len + 1`` tokens and serves the rank's micro-batches ``k ≡ v (mod W)``. When the stream ends
it starts again (the next epoch), the partial window carried over.

Resume is exact: the rank's micro-batch count after ``c`` global batches is ``c·accum``, so each
slot knows how many windows it has already served and skips them (re-tokenizing, in parallel
across workers) before serving the next. The layout (ranks, workers, micro batch) is part of the
resume fingerprint because the slots depend on it.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node
from tokenizers import Tokenizer
from torch.utils.data import IterableDataset

from olmo_mini.data.corpus import is_val
from olmo_mini.data.sampling import RankSlice, to_batch, worker_slot
from olmo_mini.data.shards import DOCS_PER_TASK, encode_documents


@dataclass(frozen=True)
class HFSource:
    """A ``datasets.load_dataset`` call: a hub name, or a builder (json/parquet/text) over files."""

    path: str
    name: str | None = None
    data_files: list[str] = field(default_factory=list)
    text_field: str = "text"

    def describe(self, split: str) -> str:
        files = f", data_files={self.data_files}" if self.data_files else ""
        return f"HF dataset {self.path!r} (name={self.name!r}, split={split!r}{files})"

    def texts(self, split: str, slot: int = 0, num_slots: int = 1) -> Iterator[list[str]]:
        """One pass over the documents of ``split`` that fall to ``slot``, in batches."""
        for pattern in (p for p in self.data_files if "://" not in p):  # local files
            matches = glob.glob(pattern)
            if not matches:
                raise FileNotFoundError(f"data file not found: {pattern}")
            if all(os.path.getsize(m) == 0 for m in matches):  # datasets fails obscurely on these
                raise ValueError(f"empty corpus: {pattern} has no data")
        kwargs = {"data_files": list(self.data_files)} if self.data_files else {}
        ds = datasets.load_dataset(self.path, self.name, split=split, streaming=True, **kwargs)
        if num_slots > 1:
            ds = split_dataset_by_node(ds, rank=slot, world_size=num_slots)
        for batch in ds.iter(batch_size=DOCS_PER_TASK):
            if self.text_field not in batch:
                raise KeyError(
                    f"{self.describe(split)} has no field {self.text_field!r} "
                    f"(fields: {sorted(batch)})"
                )
            yield batch[self.text_field]


def packed_windows(
    source: HFSource,
    split: str,
    keep: Callable[[str], bool],
    tokenizer: Tokenizer,
    eos: int,
    window: int,
    slot: int = 0,
    num_slots: int = 1,
    repeat: bool = True,
) -> Iterator[np.ndarray]:
    """Windows of ``window`` tokens from the documents ``keep`` accepts, packed in stream order."""
    carry = np.empty(0, dtype=np.uint32)
    while True:
        seen = False
        for texts in source.texts(split, slot, num_slots):
            texts = [t for t in texts if keep(t)]
            if not texts:
                continue
            seen = True
            tokens = np.concatenate([carry, encode_documents(tokenizer, texts, eos)[0]])
            full = len(tokens) // window
            yield from tokens[: full * window].reshape(full, window)
            carry = tokens[full * window :]
        if not seen:
            raise ValueError(
                f"empty corpus: {source.describe(split)} gave slot {slot} of {num_slots} "
                "(ranks × loader workers) no documents"
            )
        if not repeat:
            return


class StreamingTrainStream(IterableDataset):
    """This rank's micro-batches from global batch ``at.start`` on, tokenized in loader workers."""

    def __init__(
        self,
        source: HFSource,
        split: str,
        val_fraction: float | None,
        tokenizer_json: str,
        eos: int,
        seq_len: int,
        at: RankSlice,
    ) -> None:
        self.source, self.split, self.val_fraction = source, split, val_fraction
        self.tokenizer_json, self.eos, self.window = tokenizer_json, eos, seq_len + 1
        self.at = at
        self.consumed_micro = at.start * at.micro_per_step

    def _keep(self, text: str) -> bool:
        return self.val_fraction is None or not is_val(text, self.val_fraction)

    def __iter__(self):
        worker, num_workers = worker_slot()
        # After a resume the loader's worker 0 serves the rank's micro-batch `consumed_micro`,
        # which the uninterrupted run gave to worker `consumed_micro mod W`: act as that one.
        virtual = (self.consumed_micro + worker) % num_workers
        served = max(0, -(-(self.consumed_micro - virtual) // num_workers))
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        slot, num_slots = self.at.rank * num_workers + virtual, self.at.world_size * num_workers
        windows = packed_windows(
            self.source, self.split, self._keep, tokenizer, self.eos, self.window, slot, num_slots
        )
        micro = self.at.micro_batch_size
        windows = itertools.islice(windows, served * micro, None)
        while True:
            yield to_batch(np.stack(list(itertools.islice(windows, micro))))


def hf_documents(
    source: HFSource, split: str, max_docs: int | None = None
) -> Iterator[tuple[str, str]]:
    """``(split_key, text)`` pairs of a HF dataset, streamed, for tokenizer training and shards."""
    texts = (text for batch in source.texts(split) for text in batch)
    for text in itertools.islice(texts, max_docs):
        yield text, text
