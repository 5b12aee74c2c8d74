"""The run's tokenizer, kept in its run dir so that tools never re-derive it from data settings.

The default tokenizer lives in a cache keyed by data settings (``data.vocab_size``,
``data.val_fraction``, ...): re-deriving it from an edited config gives another tokenizer, and
its ids fed to the trained weights give a wrong number without an error. So at training start
the tokenizer file is copied to ``<run_dir>/tokenizer.json`` with its EOS token in
``tokenizer_config.json`` (which makes the run dir a tokenizer folder for ``data.tokenizer``).
Every checkpoint also carries the tokenizer's hash in its data-loader fingerprint, against which
``olmo_mini.interop`` checks the recorded file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import fsspec
import lightning as L
from tokenizers import Tokenizer

from olmo_mini.config import ConfigError
from olmo_mini.data.tokenizer import tokenizer_hash
from olmo_mini.integrity import write_text_atomic
from olmo_mini.run_dir import TOKENIZER_FILE

TOKENIZER_CONFIG = "tokenizer_config.json"
log = logging.getLogger(__name__)


class RecordTokenizer(L.Callback):
    """Copy the DataModule's tokenizer file into ``run_dir`` once the data is set up."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        with fsspec.open(data.tokenizer_path, "rt", encoding="utf-8", newline="") as f:
            text = f.read()
        # Every rank checks (so all of them stop together); rank zero writes.
        record_tokenizer(self.run_dir, text, data.tokenizer, data.eos_id, trainer.is_global_zero)


def record_tokenizer(
    run_dir: Path, text: str, tokenizer: Tokenizer, eos: int, write: bool = True
) -> None:
    """Write ``text`` (the tokenizer file) and ``tokenizer``'s EOS token into ``run_dir``.

    A run dir that already records another tokenizer is an error: its checkpoints were trained
    with that one.
    """
    target = run_dir / TOKENIZER_FILE
    if target.is_file():
        recorded = tokenizer_hash(Tokenizer.from_file(str(target)))
        if recorded != tokenizer_hash(tokenizer):
            raise ConfigError(
                f"{target} records another tokenizer (hash {recorded}) than this run's "
                f"(hash {tokenizer_hash(tokenizer)}); start the run in a new hydra.run.dir"
            )
        return
    if not write:
        return
    write_text_atomic(
        run_dir / TOKENIZER_CONFIG, json.dumps({"eos_token": tokenizer.id_to_token(eos)}, indent=2)
    )
    write_text_atomic(target, text)  # last: its presence means both files are complete
    log.info("recorded the run's tokenizer (hash %s) in %s", tokenizer_hash(tokenizer), target)
