"""Training: the LightningModule, optimizer, parallelism, checkpoints and ``run(cfg)``."""

from olmo_mini.training.module import LanguageModelModule, TrainingDiverged
from olmo_mini.training.run import RunResult, run, train

__all__ = ["LanguageModelModule", "RunResult", "TrainingDiverged", "run", "train"]
