"""Pre-tokenized shards: flat uint16/uint32 token files, document boundaries and a manifest.

Layout of a shard directory (local path or fsspec URL)::

    manifest.json          format, dtype, tokenizer hash, vocab size, EOS id, source, shards
    tokenizer.json         the tokenizer the ids came from
    train-00000.bin        raw token ids (no header), documents each ending with EOS
    train-00000.docs.npy   uint64 cumulative document end offsets into the .bin
    val-00000.bin ...

Writing tokenizes in parallel processes but writes in document order, and a shard rolls over at
a document boundary after ``shard_tokens`` tokens, so the bytes do not depend on the process
count. Reading uses ``np.memmap`` locally and fsspec byte ranges for URLs, never the whole file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import xxhash
from tokenizers import Tokenizer

from olmo_mini.data.config import DataError
from olmo_mini.data.corpus import is_val
from olmo_mini.data.tokenizer import tokenizer_hash
from olmo_mini.integrity import ALGORITHM, file_digest, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "olmo-mini-shards/1"
SPLITS = ("train", "val")
DOCS_PER_TASK = 64


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ---------------------------------------------------------------- writing


class _ShardWriter:
    """Appends documents of one split to numbered ``.bin`` files, rolling over at doc boundaries."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split = out_dir, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.records: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self._file is None:  # a new shard
            self._name = f"{self.split}-{len(self.records):05d}"
            self._file = open(self.out_dir / f"{self._name}.bin", "wb")
            self._digest = xxhash.xxh3_128()
            self._ends: list[int] = []
            self._tokens = self._max_id = 0
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._digest.update(data)
        self._ends.extend((self._tokens + np.cumsum(lengths)).tolist())
        self._tokens += len(tokens)
        self._max_id = max(self._max_id, int(tokens.max(initial=0)))
        if self._tokens >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        np.save(self.out_dir / f"{self._name}.docs.npy", np.asarray(self._ends, dtype=np.uint64))
        self.records.append(
            {
                "file": f"{self._name}.bin",
                ALGORITHM: self._digest.hexdigest(),
                "docs": f"{self._name}.docs.npy",
                "split": self.split,
                "num_tokens": self._tokens,
                "num_docs": len(self._ends),
                "max_token_id": self._max_id,
            }
        )
        self._file = None


_worker_tokenizer: Tokenizer | None = None
_worker_eos = 0


def _init_worker(tokenizer_json: str, eos: int) -> None:
    global _worker_tokenizer, _worker_eos
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tokenizer, _worker_eos = Tokenizer.from_str(tokenizer_json), eos


def _encode_task(task: tuple[list[str], list[str]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    texts, splits = task
    assert _worker_tokenizer is not None
    return (splits, *encode_documents(_worker_tokenizer, texts, _worker_eos))


def encode_documents(
    tokenizer: Tokenizer, texts: list[str], eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts``, each followed by EOS, flat (uint32); plus each document's length."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(texts))
    flat = np.empty(int(lengths.sum()), dtype=np.uint32)
    ends = np.cumsum(lengths)
    for encoding, end, length in zip(encodings, ends, lengths, strict=True):
        flat[end - length : end - 1] = encoding.ids
        flat[end - 1] = eos
    return flat, lengths


def _tasks(
    documents: Iterable[tuple[str, str]], val_fraction: float
) -> Iterator[tuple[list[str], list[str]]]:
    """Documents grouped for the workers, each tagged with its split."""
    documents = iter(documents)
    while batch := list(itertools.islice(documents, DOCS_PER_TASK)):
        splits = ["val" if is_val(key, val_fraction) else "train" for key, _ in batch]
        yield [text for _, text in batch], splits


def _encoded(
    tasks: Iterator[tuple[list[str], list[str]]], tokenizer: Tokenizer, eos: int, procs: int
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """Encode tasks in order, in ``procs`` processes with at most a few tasks in flight each."""
    if procs == 1:
        for texts, splits in tasks:
            yield (splits, *encode_documents(tokenizer, texts, eos))
        return
    in_flight = threading.BoundedSemaphore(4 * procs)

    def feed() -> Iterator[tuple[list[str], list[str]]]:
        for task in tasks:
            in_flight.acquire()
            yield task

    # forkserver: a fork of this process could deadlock on a lock that one of its threads (torch,
    # Lightning, tokenizers) held at the fork; the server forks from a clean, thread-free one.
    with mp.get_context("forkserver").Pool(procs, _init_worker, (tokenizer.to_str(), eos)) as pool:
        for result in pool.imap(_encode_task, feed()):
            in_flight.release()
            yield result


def write_shards(
    documents: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    eos: int,
    out_dir: str | Path,
    source: str,
    val_fraction: float,
    procs: int | None = None,
    shard_tokens: int = 1 << 28,
) -> dict:
    """Tokenize ``(split_key, text)`` documents into shards under ``out_dir``; return the manifest.

    ``procs`` worker processes each own a single-threaded tokenizer; ``procs=1`` tokenizes in
    this process with ``tokenizers``' own thread pool. An empty corpus is an error naming ``source``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    writers = {s: _ShardWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
    encoded = _encoded(
        _tasks(documents, val_fraction), tokenizer, eos, procs or os.cpu_count() or 1
    )
    for splits, tokens, lengths in _logged(encoded):
        for split in SPLITS:
            keep = np.fromiter((s == split for s in splits), dtype=bool, count=len(splits))
            if keep.any():  # the split's documents, in order
                writers[split].write(tokens[np.repeat(keep, lengths)], lengths[keep])
    for writer in writers.values():
        writer.close()
    if not writers["train"].records:
        raise ValueError(f"empty corpus: {source} yielded no training documents")
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": vocab_size,
        "eos_id": eos,
        "source": source,
        "val_fraction": val_fraction,
        "num_tokens": {s: sum(r["num_tokens"] for r in writers[s].records) for s in SPLITS},
        "num_docs": {s: sum(r["num_docs"] for r in writers[s].records) for s in SPLITS},
        "shards": writers["train"].records + writers["val"].records,
    }
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_text_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    docs, tokens = manifest["num_docs"], manifest["num_tokens"]
    log.info(
        f"tokenized {sum(docs.values()):,} documents (train {docs['train']:,}, val "
        f"{docs['val']:,}), {sum(tokens.values()) / 1e6:.2f}M tokens (train "
        f"{tokens['train'] / 1e6:.2f}M, val {tokens['val'] / 1e6:.2f}M): the manifest's counts"
    )
    return manifest


def _logged(
    encoded: Iterator[tuple[list[str], np.ndarray, np.ndarray]], every_s: float = 10.0
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """``encoded`` as it is, with a progress line every ``every_s`` seconds while it is
    tokenized (counts so far; ``write_shards`` logs the totals at the end)."""
    docs = tokens = 0
    started = last = time.perf_counter()
    for splits, flat, lengths in encoded:
        docs, tokens = docs + len(lengths), tokens + len(flat)
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            log.info(
                f"tokenizing: {docs:,} documents, {tokens / 1e6:.1f}M tokens so far "
                f"({tokens / (now - started) / 1e3:.0f}k tokens/s)"
            )
        yield splits, flat, lengths


# ---------------------------------------------------------------- reading


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def read_manifest(root: str) -> dict:
    """The manifest of a shard directory or URL; missing or malformed → error naming the file."""
    url = _join(str(root), "manifest.json")
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"shard manifest not found: {url}")
    try:
        manifest = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt shard manifest {url}: {e}") from None
    required = ("format", "dtype", "tokenizer_hash", "vocab_size", "eos_id", "shards")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        raise ValueError(f"corrupt shard manifest {url}: expected keys {required}")
    if manifest["format"] != FORMAT:
        raise ValueError(
            f"shard manifest {url} has format {manifest['format']!r}, expected {FORMAT!r}"
        )
    return manifest


def check_shard_files(root: str) -> None:
    """Before a run writes anything: the manifest of a local shard directory and every shard it
    lists, present at its size (no digest pass: the first read checks that), else one
    ``DataError``. URLs are left to the data module, which opens them anyway."""
    if not isinstance(
        fsspec.core.url_to_fs(str(root))[0], fsspec.implementations.local.LocalFileSystem
    ):
        return
    try:
        manifest = read_manifest(root)
        for rec in manifest["shards"]:
            TokenFile.of(root, manifest, rec)
    except (OSError, ValueError) as e:
        raise DataError(f"data.shards: {e}") from None


def manifest_hash(manifest: dict) -> str:
    """Identity of the data, for resume fingerprints."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


class TokenFile:
    """One shard's tokens, read by range: ``np.memmap`` for local files, fsspec byte ranges for
    URLs. The size is checked against the manifest up front so truncation is caught by name; a
    local file's digest (``xxh3_128`` in the manifest) on its first read, in each process that
    reads it (URLs: by ``prepare_data.py --verify``, which would otherwise download them)."""

    def __init__(self, url: str, dtype: np.dtype, num_tokens: int, digest: str | None) -> None:
        self.url, self.dtype = url, np.dtype(dtype)
        self.num_tokens, self.digest = num_tokens, digest
        self._fs, self._path = fsspec.core.url_to_fs(url)
        try:
            size = self._fs.size(self._path)
        except FileNotFoundError:
            raise DataError(f"shard not found: {url}") from None
        expected = num_tokens * self.dtype.itemsize
        if size != expected:
            raise DataError(
                f"truncated or corrupt shard {url}: {size} bytes, but the manifest says "
                f"{num_tokens} {self.dtype.name} tokens = {expected} bytes"
            )
        self._local = isinstance(self._fs, fsspec.implementations.local.LocalFileSystem)
        self._memmap: np.memmap | None = None

    @classmethod
    def of(cls, root: str, manifest: dict, rec: dict) -> TokenFile:
        """The shard of ``manifest`` (of the directory or URL ``root``) that ``rec`` describes."""
        return cls(
            _join(str(root), rec["file"]), manifest["dtype"], rec["num_tokens"], rec.get(ALGORITHM)
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_memmap": None}  # each loader worker maps the file itself

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._local:
            if self._memmap is None:
                self.verify()
                self._memmap = np.memmap(self._path, self.dtype, "r", shape=(self.num_tokens,))
            return self._memmap[start:stop]
        size = self.dtype.itemsize
        return np.frombuffer(self._fs.cat_file(self._path, start * size, stop * size), self.dtype)

    def verify(self) -> None:
        """Compare the whole file with the manifest's digest (XXH3-128) (one pass); a mismatch is an error
        naming the shard. Later calls in this process (and its loader workers) skip the pass."""
        if self.digest is None or getattr(self, "_verified", False):
            return
        with self._fs.open(self._path, "rb") as f:
            digest = file_digest(f)
        if digest != self.digest:
            raise DataError(
                f"corrupt shard {self.url}: its digest (XXH3-128) does not match the manifest (rewrite it "
                "with tools/prepare_data.py; --verify checks every shard)"
            )
        self._verified = True


def verify_shards(root: str) -> list[str]:
    """Every shard of a directory or URL checked for size and digest (XXH3-128); the problems found."""
    manifest = read_manifest(root)
    problems = []
    for rec in manifest["shards"]:
        try:
            shard = TokenFile.of(root, manifest, rec)
            if shard.digest is None:
                problems.append(
                    f"{shard.url}: no digest in the manifest (written by an older "
                    "version); size checked only"
                )
            shard.verify()
        except (OSError, ValueError) as e:
            problems.append(str(e))
    return problems


@dataclass
class ShardInstances:
    """Instances of ``seq_len + 1`` tokens cut from each shard of one split in order; a shard's
    remainder shorter than a window is dropped (documents may span instances)."""

    files: list[TokenFile]
    window: int
    vocab_size: int

    def __post_init__(self) -> None:
        counts = [f.num_tokens // self.window for f in self.files]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    @classmethod
    def open(cls, root: str, split: str, seq_len: int, manifest: dict) -> ShardInstances:
        files = [TokenFile.of(root, manifest, r) for r in manifest["shards"] if r["split"] == split]
        return cls(files, seq_len + 1, manifest["vocab_size"])

    @property
    def num_instances(self) -> int:
        return int(self.starts[-1])

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Instances ``ids`` as an int64 array ``[len(ids), window]``; an id at or beyond the
        tokenizer's vocab is an error naming the shard (a corrupt file or a foreign tokenizer)."""
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        offsets = (ids - self.starts[shard]) * self.window
        out = np.empty((len(ids), self.window), dtype=np.int64)
        for row, (s, off) in enumerate(zip(shard.tolist(), offsets.tolist(), strict=True)):
            out[row] = self.files[s].read(off, off + self.window)
        if out.size and out.max() >= self.vocab_size:
            row = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            raise ValueError(
                f"token id {int(out[row].max())} at or beyond the vocab ({self.vocab_size}) in "
                f"shard {self.files[shard[row]].url}: corrupt shard or wrong tokenizer"
            )
        return out
