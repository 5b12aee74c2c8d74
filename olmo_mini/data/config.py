"""``DataConfig``: the Hydra ``data`` group, validated on construction with messages naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field

from olmo_mini.validation import ConfigError, at_least, in_range, one_of


class DataError(ConfigError):
    """The data cannot feed the run as configured; the message names the setting and the remedy."""

    def __init__(self, message: str) -> None:
        # One raised in a loader worker reaches the main process re-created from the worker's
        # whole traceback ("Caught DataError in DataLoader worker process 0. Original
        # Traceback ..."; torch's ExceptionWrapper): keep the message it was raised with.
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            message = message.rstrip().rpartition(f"{type(self).__name__}: ")[2]
        super().__init__(message)


@dataclass
class DataConfig:
    """Where tokens come from and how they are cut into batches.

    ``source`` picks the corpus:

    - ``stdlib``: the Python standard library's ``.py`` files (always on the machine; the default).
    - ``files``: local ``.txt``/``.jsonl``/``.parquet`` files (``files``), tokenized once into cached
      shards on first use.
    - ``shards``: a directory or fsspec URL holding ``manifest.json`` written by
      ``tools/prepare_data.py``.
    - ``hf_stream``: a Hugging Face ``datasets`` streaming source (``hf_path``/``hf_name``/
      ``hf_split``/``hf_data_files``) tokenized inside the loader workers.

    ``tokenizer=None`` means the byte-level BPE trained on the stdlib corpus (cached), except for
    ``shards``, where it means the tokenizer saved next to the manifest.
    """

    source: str = "stdlib"
    seq_len: int = 256
    global_batch_size: int = 32
    micro_batch_size: int = 8
    num_workers: int = 0
    tokenizer: str | None = None
    vocab_size: int = 4096
    eos_token: str | None = None
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    shards: str | None = None
    hf_path: str | None = None
    hf_name: str | None = None
    hf_split: str = "train"
    hf_data_files: list[str] = field(default_factory=list)
    hf_val_split: str | None = None
    val_fraction: float = 0.02
    val_batches: int = 4
    max_docs: int | None = None
    prepare_procs: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        one_of("data", self, "source", ("stdlib", "files", "shards", "hf_stream"))
        batches = ("global_batch_size", "micro_batch_size", "val_batches")
        at_least("data", self, 1, "seq_len", *batches, "max_docs", "prepare_procs")
        at_least("data", self, 0, "num_workers")
        at_least("data", self, 257, "vocab_size")
        in_range("data", self, 0, 1, "val_fraction", open_high=True)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"data.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"data.micro_batch_size ({self.micro_batch_size})"
            )
        if self.source == "files" and not self.files:
            raise ConfigError("data.files must list at least one file when data.source is 'files'")
        if self.source == "shards" and not self.shards:
            raise ConfigError(
                "data.shards must name a directory or URL when data.source is 'shards'"
            )
        if self.source == "hf_stream" and not self.hf_path:
            raise ConfigError("data.hf_path must be set when data.source is 'hf_stream'")
        if self.source == "hf_stream" and self.hf_val_split is None and self.val_fraction == 0:
            raise ConfigError(
                "data.val_fraction must be > 0 when data.source is 'hf_stream' and "
                "data.hf_val_split is not set (validation needs held-out documents)"
            )

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank, so that one step sees one global batch."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"data.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"data.micro_batch_size × world size ({self.micro_batch_size} × {world_size} "
                f"= {per_step})"
            )
        return self.global_batch_size // per_step


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    """The model's vocab: the tokenizer's size rounded up to ``multiple`` (tensor-core friendly)."""
    if n <= 0 or multiple <= 0:
        raise ValueError(f"padded_vocab_size needs positive sizes, got n={n}, multiple={multiple}")
    return -(-n // multiple) * multiple
