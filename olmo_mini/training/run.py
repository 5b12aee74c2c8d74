"""``run(cfg)``: from a composed Hydra config to a finished (or resumed) training run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf

from olmo_mini.config import ConfigError, TrainConfig, load_config
from olmo_mini.data import OLMoDataModule
from olmo_mini.run_dir import claim, release, resume_command
from olmo_mini.sizing.flops import datasheet_bf16_peak, default_precision, measure_matmul_flops
from olmo_mini.training.callbacks import EndOfRunSample, build_callbacks
from olmo_mini.training.checkpoint import (
    CheckpointError,
    ResumedSettings,
    StepCheckpoint,
    changed_settings,
    checkpoint_dir,
    resolve_resume,
)
from olmo_mini.training.interrupt import Interrupted
from olmo_mini.training.module import LanguageModelModule, TrainingDiverged
from olmo_mini.training.parallel import build_strategy, cluster_plugins
from olmo_mini.training.recorder import log_config
from olmo_mini.training.wandb_run import LazyWandbLogger, StartWandbRun, hydra_labels

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    val_loss: float | None
    sample: str | None
    global_step: int


def run(cfg: DictConfig) -> RunResult:
    """``train.py``'s body: validate, train, print the result; bad input exits with one line."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        config = load_config(cfg)
        config.logger = hydra_labels(config.logger, hydra_cfg, run_dir)
        result = train(config, run_dir)
    except (ConfigError, TrainingDiverged, CheckpointError) as e:  # DataError is a ConfigError
        sys.exit(f"error: {e}")
    except Interrupted as e:
        if _is_rank_zero():
            requeued = " (SLURM job requeued)" if e.requeued else ""
            print(
                f"stopped: {e}{requeued}; resume with: {resume_command(run_dir)}", file=sys.stderr
            )
        sys.exit(e.exit_code)
    if result.val_loss is not None and _is_rank_zero():
        log.info(f"final val/loss {result.val_loss:.4f} after {result.global_step} steps")
        if result.sample is not None:
            log.info(f"sample: {result.sample!r}")
        log.info(f"run dir: {run_dir}")
    return result


def train(config: TrainConfig, run_dir: Path, callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Train as ``config`` says, writing metrics and checkpoints under ``run_dir``."""
    trainer_cfg = config.trainer
    run_id = claim(run_dir, config.resume, config.checkpoint.overwrite, torch.get_num_threads())
    sharded = trainer_cfg.strategy == "fsdp"
    ckpt_path = resolve_resume(config.resume, run_dir, sharded, run_id, config.model)
    if ckpt_path is not None:
        resumed = checkpoint_dir(ckpt_path)
        callbacks = [
            ResumedSettings(run_dir, resumed, changed_settings(resumed, config)),
            *callbacks,
        ]
    device = torch.device("cuda" if _uses_gpu(trainer_cfg.accelerator) else "cpu")
    precision = trainer_cfg.precision
    if precision == "auto":
        precision = default_precision(device.type)
    L.seed_everything(config.seed, workers=True, verbose=False)

    datamodule = OLMoDataModule(config.data, config.seed)
    module = LanguageModelModule(config, precision)
    accum = config.grad_accum_steps
    checkpoint = StepCheckpoint(
        run_dir / "checkpoints",
        config.checkpoint.every_n_steps,
        config.checkpoint.keep_last,
        config.checkpoint.save_final,
        run_id,
        OmegaConf.to_yaml(OmegaConf.structured(config)),
    )
    peak = trainer_cfg.peak_flops or peak_flops(device, precision)
    callbacks = build_callbacks(config, run_dir, precision, peak, checkpoint, callbacks)
    loggers = _loggers(config, run_dir, run_id)
    starts = [StartWandbRun(logger) for logger in loggers if isinstance(logger, LazyWandbLogger)]
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(trainer_cfg),
        plugins=cluster_plugins(),
        precision=precision,
        max_steps=trainer_cfg.stop_at_step or trainer_cfg.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accum,
        # Lightning counts these in micro-batches.
        val_check_interval=trainer_cfg.val_check_interval * accum,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        logger=loggers,
        callbacks=[*starts, *callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,  # ConsoleProgress counts optimizer steps instead
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=run_dir,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except TrainingDiverged as e:
        last = checkpoint.last_saved
        raise TrainingDiverged(
            f"{e} No checkpoint was saved during the streak; the last one before it: {last}"
            if last
            else f"{e} No checkpoint was saved before the streak."
        ) from None
    finally:
        for logger in loggers:
            if isinstance(logger, LazyWandbLogger):
                logger.finish()
        release(run_dir)
    sample = next((c.text for c in callbacks if isinstance(c, EndOfRunSample)), None)
    return RunResult(module.val_loss, sample, trainer.global_step)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for ``precision``: the dense datasheet figure for bf16 on a
    known GPU (Lightning's table otherwise), a measured matmul rate on a CPU."""
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    if device.type == "cuda":
        datasheet = datasheet_bf16_peak(torch.cuda.get_device_name(device))
        if dtype == torch.bfloat16 and datasheet is not None:
            return datasheet
        return get_available_flops(device, dtype)
    if device.type == "cpu":
        return measure_matmul_flops(dtype)
    return None


def _loggers(config: TrainConfig, run_dir: Path, run_id: str | None) -> list[Logger]:
    """CSV always, wandb when asked (its run id: the run dir's); both get the full config.

    The CSV file is ``<run_dir>/csv/version_<k>/metrics.csv`` with one version per launch: a
    resumed run starts a new version rather than overwriting the file of the run it continues.
    """
    loggers: list[Logger] = [CSVLogger(run_dir, name="csv")]
    if config.logger.kind == "wandb":
        loggers.append(LazyWandbLogger(config.logger, run_dir, run_id))
    log_config(loggers, config)
    return loggers


def _uses_gpu(accelerator: str) -> bool:
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator is 'gpu' but no CUDA device is visible")
    return accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0
