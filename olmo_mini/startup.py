"""What ``train.py`` does before torch and Lightning load: validate the config (a bad one costs
one ``error:`` line and leaves no run dir), save it resolved, pick CPU threads and quiet
third-party noise. Nothing here imports torch, so a config error is reported in about a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from olmo_mini.config import (
    ConfigError,
    TrainConfig,
    load_config,
    override_error,
    reject_repeated_overrides,
)
from olmo_mini.data.corpus import expand_files
from olmo_mini.data.shards import check_shard_files
from olmo_mini.run_dir import LOCK_FILE, continues, is_rank_zero, trained_threads

log = logging.getLogger(__name__)

# Lightning's start-up chatter ("GPU available", the litlogger tip, AMP, "`Trainer.fit` stopped"):
# the config summary line says the same (olmo_mini.training.console).
_LIGHTNING_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


def report_bad_overrides(main: Callable[[], None]) -> None:
    """Run Hydra's ``main`` with a bad override (a typo in a key, a wrong type, a missing config
    option, bad syntax) reported as one ``error:`` line naming it (exit status 1) instead of
    Hydra's multi-line report. ``OLMO_MINI_DEBUG=1`` (or ``HYDRA_FULL_ERROR=1``) keeps Hydra's."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    if os.environ.get("OLMO_MINI_DEBUG") or os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises, rather than printing and exiting 1
    try:
        main()
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as e:
        sys.exit(f"error: {override_error(e)}")


def prepare(cfg: DictConfig) -> TrainConfig:
    """Validate ``cfg`` (exit with one ``error:`` line), save it resolved, set threads and
    warning filters. Runs inside Hydra's job, before the heavy stack is imported."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    try:
        reject_repeated_overrides(hydra_cfg.overrides.task)
        config = load_config(cfg)
        if config.data.source == "files":
            expand_files(config.data.files)
        if config.data.source == "shards":
            check_shard_files(config.data.shards)
    except ConfigError as e:  # DataError too
        sys.exit(f"error: {e}")
    except (FileNotFoundError, ValueError) as e:  # from expand_files: a pattern or a suffix
        sys.exit(f"error: data.files: {e}")
    if hydra_cfg.output_subdir is not None and is_rank_zero():
        save_resolved(cfg, Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    trained_with = trained_threads(run_dir) if continues(run_dir, config.resume) else None
    set_cpu_threads(config.trainer.cpu_threads, config.trainer.devices, trained_with)
    quiet_third_party()
    return config


@contextmanager
def no_run_dir_on_bad_input() -> Iterator[None]:
    """Remove the run dir Hydra created for this job when the job exits with an ``error:``
    line (bad input) before writing anything of its own; a dir that holds more is kept."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # What Hydra and the run-dir check (olmo_mini.run_dir) write before the config is validated.
    launch_files = {str(hydra_cfg.output_subdir), f"{hydra_cfg.job.name}.log", LOCK_FILE}
    try:
        yield
    except SystemExit as e:
        bad_input = isinstance(e.code, str) and e.code.startswith("error:")
        if bad_input and is_rank_zero() and {p.name for p in run_dir.iterdir()} <= launch_files:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def save_resolved(cfg: DictConfig, hydra_dir: Path) -> None:
    """Overwrite Hydra's ``config.yaml`` with every interpolation resolved (``${hydra:...}``
    and ``${now:...}`` only resolve inside the job), so tools can read the run's config later."""
    OmegaConf.save(cfg, hydra_dir / "config.yaml", resolve=True)


def set_cpu_threads(threads: int | None, processes: int, trained_with: int | None = None) -> None:
    """Set torch's intra-op threads through ``OMP_NUM_THREADS`` before torch loads (the child
    processes Lightning starts inherit it).

    ``None`` (auto): an ``OMP_NUM_THREADS`` already set; else, for a launch that continues a run,
    the count it trained with (``trained_with``, from ``run.json``): ops sum in another order
    with another thread count, so the resumed run would not continue bit for bit; else this
    process's share of the cores that other work leaves idle (cores minus the whole cores that
    the 1-minute load average says are busy, at least 1: a load of 0.6 left over from an earlier
    job still gets every core). Every op waits for its slowest thread, so threads that compete
    with other processes for a core make each op wait for a time slice: on 2 loaded cores 2
    threads ran 9× slower than 1, while on an idle machine 2 threads are 1.6× faster
    (docs/performance.md).
    """
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    cores = os.cpu_count() or 1
    if threads is None and trained_with is not None:
        threads = trained_with
        if is_rank_zero():
            log.info(
                f"CPU threads: {threads} per process, as the run trained with (its run.json; "
                "trainer.cpu_threads=N sets another)"
            )
    elif threads is None:
        load = os.getloadavg()[0]
        threads = max(1, min(cores // processes, (cores - int(load)) // processes))
        if threads < cores // processes and is_rank_zero():
            log.info(
                f"CPU threads: {threads} per process, as the load average ({load:.1f} on "
                f"{cores} cores) leaves few idle (trainer.cpu_threads=N sets it)"
            )
    os.environ["OMP_NUM_THREADS"] = str(threads)


def quiet_third_party() -> None:
    """Silence warnings that every run would print and that say nothing about the run."""
    # Lightning's own pytree helper calls an API that torch >= 2.10 deprecates.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    for name in _LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
