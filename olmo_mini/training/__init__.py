"""Training: the LightningModule, optimizer, parallelism, checkpoints and ``run(cfg)``."""

from typing import TYPE_CHECKING

from olmo_mini._lazy import lazy_exports

if TYPE_CHECKING:
    from olmo_mini.training.module import LanguageModelModule, TrainingDiverged
    from olmo_mini.training.run import RunResult, run, train

__all__ = ["LanguageModelModule", "RunResult", "TrainingDiverged", "run", "train"]
__getattr__ = lazy_exports(
    __name__,
    {
        "LanguageModelModule": ".module",
        "TrainingDiverged": ".module",
        "RunResult": ".run",
        "run": ".run",
        "train": ".run",
    },
)
