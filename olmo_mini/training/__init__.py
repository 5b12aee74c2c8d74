"""Training: the LightningModule, optimizer, parallelism, checkpoints and ``run.run(cfg)``.
(``run`` is not exported: the name is the submodule's, which the import system sets here.)"""

from typing import TYPE_CHECKING

from olmo_mini._lazy import lazy_exports

if TYPE_CHECKING:
    from olmo_mini.training.module import TrainingDiverged
    from olmo_mini.training.run import train

__all__ = ["TrainingDiverged", "train"]
__getattr__ = lazy_exports(__name__, {"TrainingDiverged": ".module", "train": ".run"})
