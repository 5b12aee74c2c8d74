"""The wandb side of a run: its name, group and tags, one wandb run per training run, and
wandb's own conventions for going online.

- Labels: ``label`` fills ``logger.name``/``logger.group`` where the user left them unset and
  adds tags made from the overrides; ``hydra_labels`` takes them from the launch (the run dir, the
  sweep, ``+experiment=``); a study can pass its own (``<plan>/<arm>/lr<LR>/s<seed>``, the plan).
- One run: the wandb run id is the run dir's run id (``run.json``, ``olmo_mini.run_dir``), so a
  resume, a requeue or a relaunch after a crash continues the same wandb run (``resume="allow"``).
- Mode: as wandb decides (``WANDB_MODE``, ``wandb offline``), online where wandb finds
  credentials (``wandb login``'s netrc, ``WANDB_API_KEY``, a settings file), else offline. A server
  out of reach costs ``INIT_TIMEOUT_S`` seconds, then the run goes on offline under the same id.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from olmo_mini.config import WANDB_TAG_LENGTH, LoggerConfig

log = logging.getLogger(__name__)

# wandb waits 90 s for its server by default; without a route to it a run should go on offline
# within seconds. WANDB_INIT_TIMEOUT, when set, wins.
INIT_TIMEOUT_S = 15.0
# Override keys that say where or how a run is launched, logged or saved, not what is trained:
# no tags.
_NOT_SETTINGS = ("hydra", "cluster", "logger", "checkpoint", "resume")


def override_tags(overrides: Sequence[str]) -> list[str]:
    """Short tags for the settings that command-line overrides change: ``optim.lr=1e-3`` →
    ``lr=1e-3``, ``+experiment=qk_lr_sweep`` → ``experiment=qk_lr_sweep``."""
    tags = []
    for override in overrides:
        key, equals, value = override.lstrip("+").partition("=")
        if equals and not key.startswith("~") and key.split(".")[0] not in _NOT_SETTINGS:
            tags.append(f"{key.rsplit('.', 1)[-1]}={value}"[:WANDB_TAG_LENGTH])
    return tags


def label(
    logger: LoggerConfig,
    name: str,
    group: str | None,
    overrides: Sequence[str] = (),
    tags: Sequence[str] = (),
) -> LoggerConfig:
    """``logger`` with ``name`` and ``group`` where the user set none, and after the user's tags
    ``tags`` and those of ``overrides`` (see ``override_tags``)."""
    return replace(
        logger,
        name=logger.name or name,
        group=logger.group or group,
        tags=list(dict.fromkeys([*logger.tags, *tags, *override_tags(overrides)])),
    )


def hydra_labels(logger: LoggerConfig, hydra_cfg: DictConfig, run_dir: Path) -> LoggerConfig:
    """``label`` from the Hydra launch: a single run is named by its run dir and grouped by its
    experiment; a sweep job by its overrides (else ``<sweep dir name>/<job number>``) and sweep dir."""
    from hydra.types import RunMode

    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = str(hydra_cfg.sweep.dir)
        name = hydra_cfg.job.override_dirname or f"{Path(sweep).name}/{hydra_cfg.job.num}"
        group = sweep
    else:
        name, group = run_dir.name, hydra_cfg.runtime.choices.get("experiment")
    return label(logger, name, group, list(hydra_cfg.overrides.task))


class LazyWandbLogger(Logger):
    """A Lightning logger for one wandb run, started (``start_run``) when training starts
    (``StartWandbRun``) or else with the first metrics logged: Lightning's ``WandbLogger`` starts
    its run at setup, so a launch refused there (the data's rules, the checkpoint's restore) would
    leave a crashed one behind. Metrics carry the optimizer step as ``trainer/global_step``, the
    run's x-axis (as in ``WandbLogger``). Rank zero only."""

    def __init__(self, config: LoggerConfig, run_dir: Path, run_id: str | None) -> None:
        super().__init__()
        timeout = {} if "WANDB_INIT_TIMEOUT" in os.environ else {"init_timeout": INIT_TIMEOUT_S}
        self._init: dict[str, Any] = {
            "project": config.project,
            "entity": config.entity,
            "name": config.name or run_dir.name,
            "group": config.group,
            "tags": list(config.tags),
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
            "settings": {"silent": True, **timeout},  # no banner or summary: those are in wandb/
        }
        self._mode = config.mode
        self._run: Any = None

    @property
    def name(self) -> str:
        return self._init["name"]

    @property
    def version(self) -> str | None:
        return self._init["id"]

    @rank_zero_only
    def start(self) -> None:
        if self._run is None:
            self._run = start_run(self._init, self._mode)
            self._run.define_metric("trainer/global_step")
            self._run.define_metric("*", step_metric="trainer/global_step", step_sync=True)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any]) -> None:  # type: ignore[override]
        self._init["config"] = params  # the run starts with them
        if self._run is not None:
            self._run.config.update(params, allow_val_change=True)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.start()
        self._run.log({**metrics, "trainer/global_step": step} if step is not None else metrics)

    def finish(self) -> None:
        """Close the wandb run if it started: the next run in this process (a sequential Hydra
        sweep) starts its own. wandb's service writes the run's file after ``finish`` returns;
        ``teardown`` waits for it, so that the run can be read at once (as a study does)."""
        import wandb

        if self._run is not None:
            self._run.finish()
            wandb.teardown()


class StartWandbRun(L.Callback):
    """Starts the wandb run as training starts, once setup and the checkpoint's restore have
    passed; first among the callbacks, so that no step's timing includes wandb's start-up."""

    def __init__(self, logger: LazyWandbLogger) -> None:
        self.logger = logger

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.logger.start()


def start_run(init: dict[str, Any], requested_mode: str | None) -> Any:
    """``wandb.init(**init)`` in ``choose_mode``'s mode, announced in one console line."""
    import wandb

    mode, why = choose_mode(requested_mode)
    files = Path(init["dir"]) / "wandb"
    before = set(files.glob("run-*"))
    try:
        run = wandb.init(**init, mode=mode)
    except wandb.errors.Error as e:
        if mode != "online":
            raise
        wandb.teardown()  # wandb's service holds the failed run's id until it stops
        for leftover in set(files.glob("run-*")) - before:  # the failed start's files
            shutil.rmtree(leftover, ignore_errors=True)
        run = wandb.init(**init, mode="offline")
        reason = str(e).strip().splitlines()[-1]
        log.warning(
            f"wandb could not start online ({reason}); the run goes on offline in "
            f"{_folder(run)}; upload it later with: wandb sync {_offline_glob(run, files)}"
        )
        return run
    if mode == "online":
        log.info(f"wandb online: {run.url} (files in {_folder(run)})")
    elif mode == "offline":
        log.info(
            f"wandb offline ({why}): {_folder(run)}; upload with: "
            f"wandb sync {_offline_glob(run, files)}"
        )
    else:
        log.info(f"wandb disabled ({why})")
    return run


def choose_mode(requested: str | None) -> tuple[str, str]:
    """The mode a wandb run starts in (see the module docstring), and why, for its console line."""
    import wandb

    if requested is not None:
        return requested, f"logger.mode={requested}"
    mode = wandb.setup().settings.mode
    source = f"WANDB_MODE={os.environ['WANDB_MODE']}" if "WANDB_MODE" in os.environ else None
    if mode in ("offline", "dryrun"):
        return "offline", source or "`wandb offline`"
    if mode == "disabled":
        return "disabled", source or "wandb's settings"
    if wandb.login(prompt=False, verify=False):
        return "online", "credentials"
    return "offline", "no wandb credentials; `wandb login` or WANDB_API_KEY to log online"


def _folder(run: Any) -> Path:
    return Path(run.dir).parent  # run.dir is the run folder's files/


def _offline_glob(run: Any, files: Path) -> str:
    """Every offline launch of this run: ``wandb sync`` uploads them as one run, in order."""
    return str(files / f"offline-run-*-{run.id}")
