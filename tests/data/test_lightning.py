"""The DataModule inside a Lightning Trainer: layout from the trainer, position in the checkpoint."""

from pathlib import Path

import lightning as L
import torch

from olmo_mini.data import DataConfig, OLMoDataModule


class Recorder(L.LightningModule):
    """Records what it was fed."""

    def __init__(self, accum: int) -> None:
        super().__init__()
        self.accum, self.seen = accum, []
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"].clone())
        return self.weight * batch["input_ids"].float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.weight], lr=0.1)


def fit(shard_dir: Path, steps: int, tmp_path: Path, ckpt: str | None = None) -> Recorder:
    config = DataConfig(
        source="shards", shards=str(shard_dir), seq_len=16, global_batch_size=4, micro_batch_size=2
    )
    dm = OLMoDataModule(config, seed=0)
    model = Recorder(config.grad_accum_steps(1))
    trainer = L.Trainer(
        max_steps=steps,
        accumulate_grad_batches=model.accum,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    assert dm.state_dict()["consumed_global_batches"] == steps
    trainer.save_checkpoint(tmp_path / f"step{steps}.ckpt")
    return model


def test_resume_through_a_lightning_checkpoint(shard_dir: Path, tmp_path: Path) -> None:
    whole = fit(shard_dir, 5, tmp_path)
    fit(shard_dir, 2, tmp_path)
    resumed = fit(shard_dir, 5, tmp_path, ckpt=str(tmp_path / "step2.ckpt"))
    assert len(resumed.seen) == 3 * 2
    for a, b in zip(resumed.seen, whole.seen[2 * 2 :], strict=True):
        assert torch.equal(a, b)
