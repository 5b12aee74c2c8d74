"""``OLMoDataModule``: tokenizer, train/val loaders and the resumable loader position.

The position is one integer, ``consumed_global_batches``: under a Trainer its optimizer step
count (every step consumes one global batch, skipped steps too). Both paths are deterministic
functions of it (shards: the permutation; streaming: the slot's served-window count), so it is
the whole loader state;
``state_dict`` adds a fingerprint so a checkpoint is never resumed on other data.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import signal
from functools import partial
from typing import Literal

import fsspec
import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from olmo_mini.data.cache import content_key
from olmo_mini.data.config import DataConfig, DataError
from olmo_mini.data.corpus import is_val
from olmo_mini.data.prepare import resolve_tokenizer_and_shards
from olmo_mini.data.sampling import RankSlice, ShuffledTrainStream, fixed_batches
from olmo_mini.data.shards import ShardInstances, manifest_hash, read_manifest
from olmo_mini.data.streaming import HFSource, StreamingTrainStream, packed_windows
from olmo_mini.data.tokenizer import eos_id, load_tokenizer, tokenizer_hash


class OLMoDataModule(L.LightningDataModule):
    """Serves this rank's share of every global batch; see ``olmo_mini.data.sampling``."""

    def __init__(
        self, config: DataConfig, seed: int, rank: int | None = None, world_size: int | None = None
    ) -> None:
        super().__init__()
        if seed < 0:
            raise ValueError(f"seed must be ≥ 0 for the data permutation, got {seed}")
        self.config, self.seed = config, seed
        self._rank, self._world_size = rank, world_size
        self._consumed = 0
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_path: str | None = None
        self.vocab_size = 0
        self.eos_id = 0
        self.fingerprint: dict | None = None
        self._pending_state: dict | None = None
        # Set by ``setup``: where batches come from (a shard root or a streamed Hugging Face
        # dataset), what it opened there, and the fixed validation windows.
        self.source: Literal["shards", "stream"] | None = None
        self._manifest: dict | None = None  # shards
        self._shard_root: str | None = None  # shards
        self._train: ShardInstances | None = None  # shards: the training split
        self._what = ""  # shards: the training split as errors name it
        self._stream: HFSource | None = None  # stream
        self._held_out: float | None = None  # stream: val_fraction of hf_split, unless hf_val_split
        self._val_windows: np.ndarray | None = None

    # ------------------------------------------------------------ layout

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else self.trainer.global_rank

    @property
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else self.trainer.world_size

    # ------------------------------------------------------------ building

    def prepare_data(self) -> None:
        """Build the cached tokenizer and shards once per node (Lightning: local rank 0 only)."""
        resolve_tokenizer_and_shards(self.config)

    def setup(self, stage: str | None = None) -> None:
        if self.fingerprint is not None:
            return
        config = self.config
        config.grad_accum_steps(self.world_size)
        tokenizer_path, shards = resolve_tokenizer_and_shards(self.config)
        self.tokenizer_path = tokenizer_path
        self.source = "stream" if shards is None else "shards"
        if self.source == "shards":
            self._setup_shards(shards, tokenizer_path)
        else:
            self._setup_stream(tokenizer_path)
        self.vocab_size = self.tokenizer.get_vocab_size()
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    def _setup_shards(self, root: str, tokenizer_path: str) -> None:
        config = self.config
        manifest = read_manifest(root)
        fs, path = fsspec.core.url_to_fs(tokenizer_path)
        if not fs.exists(path):
            raise FileNotFoundError(f"tokenizer not found: {tokenizer_path}")
        self.tokenizer = Tokenizer.from_str(fs.cat_file(path).decode())
        if tokenizer_hash(self.tokenizer) != manifest["tokenizer_hash"]:
            raise ValueError(
                f"tokenizer mismatch: {tokenizer_path} (hash {tokenizer_hash(self.tokenizer)}) is not "
                f"the tokenizer of {root}/manifest.json (hash {manifest['tokenizer_hash']})"
            )
        self._manifest, self._shard_root = manifest, root
        self.eos_id = manifest["eos_id"]
        self._train = ShardInstances.open(root, "train", config.seq_len, manifest)
        val = ShardInstances.open(root, "val", config.seq_len, manifest)
        n_val = min(val.num_instances, config.val_batches * config.global_batch_size)
        self._what = f"the training split of {root}"
        _check_splits(config, self._what, self._train.num_instances, n_val, self.world_size)
        self._val_windows = val.read(np.arange(n_val))
        self.fingerprint = self._fingerprint(manifest_hash(manifest))

    def _setup_stream(self, tokenizer_path: str) -> None:
        config = self.config
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.eos_id = eos_id(self.tokenizer, config.eos_token, tokenizer_path)
        self._stream = HFSource(
            config.hf_path, config.hf_name, list(config.hf_data_files), config.text_field
        )
        if config.hf_val_split is None:
            val_split, self._held_out = config.hf_split, config.val_fraction
            keep_val = lambda text: is_val(text, config.val_fraction)  # noqa: E731
        else:
            val_split, self._held_out = config.hf_val_split, None
            keep_val = lambda text: True  # noqa: E731
        n_val = config.val_batches * config.global_batch_size
        windows = packed_windows(
            self._stream,
            val_split,
            keep_val,
            self.tokenizer,
            self.eos_id,
            config.seq_len + 1,
            repeat=False,
        )
        collected = list(itertools.islice(windows, n_val))
        self._val_windows = np.stack(collected) if collected else np.empty((0, config.seq_len + 1))
        identity = content_key(
            {
                "source": repr(self._stream),
                "split": config.hf_split,
                "val_split": config.hf_val_split,
                "val_fraction": self._held_out,
            }
        )
        self.fingerprint = self._fingerprint(
            identity,
            layout={
                "world_size": self.world_size,
                "num_workers": config.num_workers,
                "micro_batch_size": config.micro_batch_size,
            },
        )

    def _fingerprint(self, data: str, layout: dict | None = None) -> dict:
        return {
            "seed": self.seed,
            "seq_len": self.config.seq_len,
            "global_batch_size": self.config.global_batch_size,
            "data": data,
            "tokenizer": tokenizer_hash(self.tokenizer),
            **(layout or {}),
        }

    # ------------------------------------------------------------ loaders

    def train_dataloader(self) -> DataLoader:
        config = self.config
        at = RankSlice(
            config.global_batch_size,
            config.micro_batch_size,
            self.rank,
            self.world_size,
            self.consumed_global_batches,
        )
        if self.source == "shards":
            dataset = ShuffledTrainStream(self._train, self._what, self.seed, at)
        else:
            dataset = StreamingTrainStream(
                self._stream,
                config.hf_split,
                self._held_out,
                self.tokenizer.to_str(),
                self.eos_id,
                config.seq_len,
                at,
            )
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=config.num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=partial(_init_worker, rank=self.rank),
        )

    def val_dataloader(self) -> DataLoader:
        batches = fixed_batches(
            self._val_windows,
            self.config.val_batches * self.config.global_batch_size,
            self.config.micro_batch_size,
            self.rank,
            self.world_size,
        )
        return DataLoader(batches, batch_size=None)

    # ------------------------------------------------------------ checks and resume

    def check_vocab(self, model_vocab_size: int) -> None:
        """A token id at or beyond the model's vocab is an error naming where it comes from."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"tokenizer {self.tokenizer_path} has {self.vocab_size} ids, more than the "
                f"model's vocab_size ({model_vocab_size})"
            )
        for record in (self._manifest or {}).get("shards", []):
            if record["max_token_id"] >= model_vocab_size:
                raise ValueError(
                    f"shard {self._shard_root}/{record['file']} holds token id "
                    f"{record['max_token_id']}, at or beyond the model's vocab_size "
                    f"({model_vocab_size})"
                )

    @property
    def consumed_global_batches(self) -> int:
        """Under a Trainer its step count (restored before the loaders are built on resume);
        without one (tools, tests) the position set or loaded."""
        return self._consumed if self.trainer is None else self.trainer.global_step

    @consumed_global_batches.setter
    def consumed_global_batches(self, value: int) -> None:
        self._consumed = value

    def state_dict(self) -> dict:
        return {
            "consumed_global_batches": self.consumed_global_batches,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the position; checked against this run's data once ``setup`` has run."""
        if self.fingerprint is None:
            self._pending_state = state_dict
            return
        saved = state_dict["fingerprint"]
        if saved != self.fingerprint:
            diff = {
                k: (saved.get(k), self.fingerprint.get(k))
                for k in sorted(set(saved) | set(self.fingerprint))
                if saved.get(k) != self.fingerprint.get(k)
            }
            raise DataError(
                "resume: the checkpoint's data loader does not match this run's data "
                f"(field: (checkpoint, now)): {diff}; resuming would not replay the same batches"
            )
        self.consumed_global_batches = int(state_dict["consumed_global_batches"])
        self._pending_state = None


def _check_splits(config: DataConfig, what: str, n_train: int, n_val: int, world_size: int) -> None:
    """Before training: at least one global batch to train on and held-out sequences to validate
    on (a tiny corpus can hold out nothing at the default ``data.val_fraction``)."""
    if n_train < config.global_batch_size:
        raise DataError(
            f"data: {what} has {n_train} sequences of data.seq_len + 1 = {config.seq_len + 1} "
            f"tokens, fewer than one global batch (data.global_batch_size="
            f"{config.global_batch_size}): add data or lower data.global_batch_size or data.seq_len"
        )
    if n_val < config.micro_batch_size * world_size:
        raise DataError(
            f"data.val_fraction ({config.val_fraction}) holds out {n_val} sequences of "
            f"{config.seq_len + 1} tokens, fewer than one micro-batch per process "
            f"(data.micro_batch_size × processes = {config.micro_batch_size} × {world_size}), so "
            "there is nothing to validate on: raise "
            "data.val_fraction (a few documents need 0.2 or more) or add documents"
        )


# What the main process handles (olmo_mini.training.interrupt): SIGTERM, SIGINT and the choices
# of checkpoint.requeue_signal.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def _init_worker(worker_id: int, rank: int) -> None:
    """A loader worker ignores the stop signals: sent to the whole process group (SLURM, Ctrl-C),
    they would kill it before the main process saves at the next step. The main process shuts the
    workers down when it stops, and a worker exits by itself once the main process is gone. Then
    Lightning's worker seeding (``seed_everything(workers=True)``), which it adds only to loaders
    without a ``worker_init_fn``."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)


def _kill_workers_left_at_exit() -> None:
    """Kill the loader workers still alive when the main process exits (an error raised while
    the training loader was open keeps its iterator, so its workers, alive). Python's own exit
    handler stops daemonic children with SIGTERM and then waits for them, and loader workers
    ignore SIGTERM (``_init_worker``): it would wait forever. Registered after it, this one
    runs first."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_workers_left_at_exit)
