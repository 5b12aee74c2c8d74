"""A study in wandb (``tools/study.py --wandb``): every run of a plan is a wandb run named
``<plan>/<arm>/lr<LR>/s<seed>``, grouped by its plan and tagged with its arm and the settings the
arm, LR and seed change; at the end, one summary run per plan (``<plan>/summary``, job type
``summary``, same group) carries the report's tables (``wandb.Table``) and figures
(``wandb.Image``). Online or offline as every training run decides (``wandb_run.choose_mode``).

The switch is the study's, not the plan's: a plan's overrides (``logger=none``) and so its run
ids stay as they are, and the same command with ``--wandb`` reuses every completed run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from olmo_mini.analysis.study import (
    FIELDS,
    Plan,
    RunSpec,
    StudyError,
    WandbLabels,
    arm_results,
)
from olmo_mini.config import WANDB_TAG_LENGTH, LoggerConfig
from olmo_mini.training.wandb_run import init_args, label, start_run

# The summary run's folder under the study's --out: its run.json keeps one wandb run id per
# plan, so a later render (more runs done, --render-only) continues the same summary run.
SUMMARY_DIR = "summary"
RUNS_TABLE = "study/runs"
ARMS_TABLE = "study/arms"
ARM_COLUMNS = (
    "arm",
    "seed",
    "lrs",
    "init_loss",
    "best_lr",
    "best_final_loss",
    "lr_sensitivity",
    "diverged_at_lrs",
)


def run_labels(plan: Plan) -> WandbLabels:
    """What ``run_plan(..., wandb=)`` calls per run: its ``logger`` turned into a wandb logger,
    labelled unless the plan's base set the fields: name ``<plan>/<arm>/lr<LR>/s<seed>``, group
    the plan, tags the arm and the settings of its own overrides (the arm's, ``lr=``, ``seed=``;
    the base is every run's)."""

    def labelled(spec: RunSpec, logger: LoggerConfig) -> LoggerConfig:
        own = spec.overrides[len(plan.base) :]
        name = f"{plan.name}/{spec.label}/lr{spec.lr:g}/s{spec.seed}"
        tagged = label(logger, name, plan.name, own, [spec.label[:WANDB_TAG_LENGTH]])
        return replace(tagged, kind="wandb")

    return labelled


def log_summary(
    plan: Plan, rows: Sequence[Mapping[str, Any]], report: Sequence[Path], out: Path
) -> Path | None:
    """Log ``plan``'s summary run in ``<out>/summary``: the per-run rows (``summary.csv``'s
    columns) and the arm ranking as tables, and the report's PNG figures as images; return the
    run's wandb folder (None when wandb is disabled). Its project, entity and mode are the
    plan's runs' (``logger.*`` in the plan's base, else the defaults). The folder is locked
    meanwhile: another process logging it is a ``StudyError``."""
    import torch

    from olmo_mini.config import ConfigError, compose_config
    from olmo_mini.run_dir import claim, release

    folder = out / SUMMARY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    logger = label(compose_config(list(plan.base)).logger, f"{plan.name}/summary", plan.name)
    try:
        run_id = claim(folder, "auto", False, torch.get_num_threads())
    except ConfigError as err:
        raise StudyError(f"plan {plan.name!r}: its summary run: {err}") from None
    try:
        init = init_args(replace(logger, tags=[*logger.tags, "summary"]), folder, run_id)
        return _log_report(start_run({**init, "job_type": "summary"}, logger.mode), rows, report)
    finally:
        release(folder)


def _log_report(run: Any, rows: Sequence[Mapping[str, Any]], report: Sequence[Path]) -> Path | None:
    """Log the tables and figures to ``run`` and finish it; return its folder (None: disabled)."""
    import wandb

    arms = [
        [
            a.arm,
            a.seed,
            len(a.finals),
            a.init_loss,
            a.best_lr,
            a.best_loss,
            a.sensitivity,
            ", ".join(f"{lr:g}" for lr in a.diverged_lrs) or "none",
        ]
        for a in arm_results(rows)
    ]
    figures = {f"figures/{p.stem}": wandb.Image(str(p)) for p in report if p.suffix == ".png"}
    folder = None if run.disabled else Path(run.dir).parent
    # Each render at the next step, online or offline (where wandb restarts at 0 and `wandb
    # sync` would drop a later launch's step 0): the step is the number of earlier launches.
    renders = len(list(folder.parent.glob(f"*run-*-{run.id}"))) - 1 if folder else 0
    run.log(
        {
            RUNS_TABLE: wandb.Table(
                columns=list(FIELDS), data=[[r[k] for k in FIELDS] for r in rows]
            ),
            ARMS_TABLE: wandb.Table(columns=list(ARM_COLUMNS), data=arms),
            **figures,
        },
        step=renders,
    )
    run.finish()
    wandb.teardown()  # the run's files are complete when this returns
    return folder
