"""The run's tokenizer, kept in its run dir so that tools never re-derive it from data settings:
a tokenizer re-derived from an edited config can differ, and its ids fed to the trained weights
give a wrong number without an error (docs/interop.md). ``olmo_mini.interop`` checks the
recorded file against the tokenizer hash in every checkpoint's data-loader fingerprint.
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
    """Copy the DataModule's tokenizer file and its EOS token into ``run_dir`` once the data is
    set up. A run dir that already records another tokenizer is an error: its checkpoints were
    trained with that one."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data, target = trainer.datamodule, self.run_dir / TOKENIZER_FILE
        ours = tokenizer_hash(data.tokenizer)
        # Every rank checks (so all of them stop together); rank zero writes.
        if target.is_file():
            recorded = tokenizer_hash(Tokenizer.from_file(str(target)))
            if recorded != ours:
                raise ConfigError(
                    f"{target} records another tokenizer (hash {recorded}) than this run's "
                    f"(hash {ours}); start the run in a new hydra.run.dir"
                )
            return
        if not trainer.is_global_zero:
            return
        with fsspec.open(data.tokenizer_path, "rt", encoding="utf-8", newline="") as f:
            text = f.read()
        eos = {"eos_token": data.tokenizer.id_to_token(data.eos_id)}
        write_text_atomic(self.run_dir / TOKENIZER_CONFIG, json.dumps(eos, indent=2))
        write_text_atomic(target, text)  # last: its presence means both files are complete
        log.info("recorded the run's tokenizer (hash %s) in %s", ours, target)
