"""The optimizer-step hooks under gradient accumulation, and the recount of Lightning's private
micro-batch counters on a resume with another accumulation (fails when Lightning moves them)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from olmo_mini.stepping import StepCallback, recount_micro_batches


class Linear(L.LightningModule):
    def __init__(self, accumulation: int) -> None:
        super().__init__()
        self.accumulation = accumulation
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(64, 2), batch_size=1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        recount_micro_batches(checkpoint, self.accumulation)


class Steps(StepCallback):
    """Each step's micro-batch indices; saves a checkpoint at ``save_at``."""

    def __init__(self, save_at: int | None = None, path: str = "") -> None:
        super().__init__()
        self.save_at, self.path = save_at, path
        self.micro_batches: list[int] = []
        self.steps: dict[int, list[int]] = {}
        self.pre_optim_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.micro_batches.append(batch_idx)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def pre_optim_step(self, trainer, pl_module, optimizer) -> None:
        self.pre_optim_steps += 1

    def post_optim_step(self, trainer, pl_module, step: int) -> None:
        assert step == trainer.global_step
        self.steps[step], self.micro_batches = self.micro_batches, []
        if step == self.save_at:  # where the project's checkpoints are saved
            trainer.save_checkpoint(self.path)


def _fit(accumulation: int, max_steps: int, steps: Steps, ckpt_path: str | None = None) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulation,
        callbacks=[steps],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Linear(accumulation), ckpt_path=ckpt_path)


def test_step_hooks_fire_once_per_optimizer_step_after_its_last_micro_batch(tmp_path):
    steps = Steps()
    _fit(accumulation=3, max_steps=2, steps=steps)
    assert steps.steps == {1: [0, 1, 2], 2: [3, 4, 5]}
    assert steps.pre_optim_steps == 2


def test_a_resume_with_another_accumulation_keeps_steps_aligned(tmp_path):
    """Saved after 2 steps of 2 micro-batches, resumed with 3 per step: without the recount
    Lightning would count 4 micro-batches done and end step 3 after 2 more."""
    path = str(tmp_path / "step_2.ckpt")
    saving = Steps(save_at=2, path=path)
    _fit(accumulation=2, max_steps=2, steps=saving)
    assert saving.steps == {1: [0, 1], 2: [2, 3]}
    resumed = Steps()
    _fit(accumulation=3, max_steps=4, steps=resumed, ckpt_path=path)
    assert resumed.steps == {3: [6, 7, 8], 4: [9, 10, 11]}
