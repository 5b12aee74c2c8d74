"""A stability study: a named grid of training runs (arms × LRs × seeds), run one after another,
resumable, and rendered as one summary row per run plus an arm table and figures.

A plan is a YAML file (``studies/<name>.yaml``): ``base`` overrides shared by every run,
``arms`` (name → overrides), ``lrs`` and ``seeds``, and optionally ``sizes`` (name → overrides):
then every arm runs at every size, and the report adds LR sensitivity against the model's
non-embedding parameters (Wortsman et al.'s Fig. 1). Each run trains in this process (no
interpreter start-up per run) in its own directory ``<out>/<run_id>``; the run id carries a
hash of the run's full overrides, so editing a plan makes new runs instead of reusing old ones.
A run is complete only when its ``result.json`` (the summary row) exists: it is written
atomically after training ends, so a study killed mid-run redoes that run from a fresh
directory and skips every completed one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure

from olmo_mini.analysis.compare import (
    LR_KEY,
    final_loss,
    init_loss,
    line_style,
    max_attention_logit,
    plot_final_loss_vs_lr,
    run_trajectory,
    save_figure,
    set_growth_scale,
    spans_decades,
)
from olmo_mini.analysis.runs import Run, load_run_dir
from olmo_mini.analysis.sensitivity import (
    DIVERGED_SHARE_ABOVE_INIT,
    Arm,
    GridRun,
    Trajectory,
    capped_loss,
    ended_diverged,
    is_diverged,
    lr_sensitivity,
    score_arms,
)
from olmo_mini.integrity import write_text_atomic
from olmo_mini.run_dir import try_lock, unlock

if TYPE_CHECKING:
    from olmo_mini.config import LoggerConfig

log = logging.getLogger(__name__)

PLAN_DIR = Path(__file__).resolve().parents[2] / "studies"
RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.csv"
# The trajectory outcomes (``sensitivity.Trajectory``), as columns; CSVs written before they
# existed lack them (and ``diverged_by_final``), and read back with them unknown (None).
TRAJECTORY_FIELDS = (
    "max_train_loss",
    "max_train_loss_step",
    "non_finite_steps",
    "steps_above_init",
    "share_above_init",
    "first_above_init",
    "recovered",
)
_TRAJECTORY_COLUMNS = dict(
    zip(TRAJECTORY_FIELDS, (f.name for f in dataclasses.fields(Trajectory)), strict=True)
)
# One row per run, in this column order (the committed per-plan CSV).
FIELDS = (
    "plan",
    "arm",
    "lr",
    "seed",
    "size",
    "non_embedding_params",
    "run_id",
    "steps",
    "max_steps",
    "init_loss",
    "final_loss",
    "final_from",
    "stopped_early",
    "diverged",
    "diverged_by_final",
    *TRAJECTORY_FIELDS,
    "peak_attn_logit",
    "peak_attn_logit_layer",
    "peak_attn_logit_step",
    "min_attn_entropy",
    "peak_abs_logsumexp",
    "final_logsumexp",
    "spike_score_loss",
    "spike_score_grad",
    "cpu_s",
    "wall_s",
    "load_avg_1m",
    "overrides",
)
# Columns CSVs written before plans had sizes lack; they read back as no size (one model).
_SIZE_DEFAULTS = {"size": "", "non_embedding_params": None}
_LSE_KEY = "logits/mean_logsumexp"
# A run's wandb logger from its spec and its config's logger (``study_wandb.run_labels``).
WandbLabels = Callable[["RunSpec", "LoggerConfig"], "LoggerConfig"]


class StudyError(ValueError):
    """A plan or a study folder is not usable; the message names the file and field."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of a plan."""

    arm: str
    lr: float
    seed: int
    overrides: tuple[str, ...]  # the full Hydra override list, base first
    size: str = ""  # the plan's size name; "" when the plan has no sizes

    @property
    def label(self) -> str:
        """The arm as rows and reports name it: ``<size>, <arm>`` when the plan has sizes."""
        return size_label(self.size, self.arm)

    @property
    def run_id(self) -> str:
        digest = hashlib.sha1("\n".join(self.overrides).encode()).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9.]+", "_", self.label).strip("_")
        return f"{slug}-lr{self.lr:g}-s{self.seed}-{digest}"


@dataclass(frozen=True)
class Plan:
    """A named grid: every arm at every LR and seed, on the same ``base`` overrides."""

    name: str
    description: str
    base: tuple[str, ...]
    arms: dict[str, tuple[str, ...]]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    series: tuple[str, ...]  # metrics drawn over steps, one figure each
    sizes: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def runs(self) -> list[RunSpec]:
        """Size by size (smallest first, as listed), then arm, LR and seed: a partial study
        holds whole sizes and arms first."""
        return [
            RunSpec(
                arm,
                lr,
                seed,
                (*self.base, *shape, *extra, f"optim.lr={lr!r}", f"seed={seed}"),
                size,
            )
            for size, shape in (self.sizes or {"": ()}).items()
            for arm, extra in self.arms.items()
            for lr in self.lrs
            for seed in self.seeds
        ]


def size_label(size: str, arm: str) -> str:
    return f"{size}, {arm}" if size else arm


def plan_path(name: str | Path) -> Path:
    """A plan file: a path as given, else ``studies/<name>.yaml``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    return PLAN_DIR / f"{name}.yaml"


def load_plan(name: str | Path) -> Plan:
    """Read and check a plan; every problem is one ``StudyError`` naming the file and field."""
    path = plan_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in PLAN_DIR.glob("*.yaml"))
        raise StudyError(
            f"plan {str(name)!r}: no file {path} (plans in {PLAN_DIR}: {', '.join(known)})"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise StudyError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: expected a mapping with base, arms, lrs, seeds")
    fields = {"description", "base", "arms", "lrs", "seeds", "series", "sizes"}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise StudyError(f"{path}: unknown fields {unknown}")

    def strings(value: Any, field: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise StudyError(f"{path}: {field} must be a list of strings, got {value!r}")
        return tuple(value)

    def numbers(field: str, kind: type) -> tuple:
        value = data.get(field)
        if not isinstance(value, list) or not value:
            raise StudyError(f"{path}: {field} must be a non-empty list, got {value!r}")
        try:
            out = tuple(kind(v) for v in value if not isinstance(v, bool))
        except (TypeError, ValueError):
            raise StudyError(f"{path}: {field} must hold numbers, got {value!r}") from None
        if len(out) != len(value) or len(set(out)) != len(out):
            raise StudyError(f"{path}: {field} must hold distinct numbers, got {value!r}")
        return out

    arms_raw = data.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise StudyError(f"{path}: arms must be a non-empty mapping of name to overrides")
    arms = {str(k): strings(v, f"arms.{k}") for k, v in arms_raw.items()}
    sizes_raw = data.get("sizes", {})
    if not isinstance(sizes_raw, dict) or ("sizes" in data and not sizes_raw):
        raise StudyError(f"{path}: sizes must be a non-empty mapping of name to overrides")
    sizes = {str(k): strings(v, f"sizes.{k}") for k, v in sizes_raw.items()}
    lrs = numbers("lrs", float)
    if any(lr <= 0 for lr in lrs):
        raise StudyError(f"{path}: lrs must be positive, got {list(lrs)}")
    base = strings(data.get("base"), "base")
    named = [("base", base)]
    named += [(f"arms.{arm}", overrides) for arm, overrides in arms.items()]
    named += [(f"sizes.{size}", overrides) for size, overrides in sizes.items()]
    for field, overrides in named:
        for o in overrides:
            if o.split("=", 1)[0].lstrip("+~") in ("optim.lr", "seed"):
                raise StudyError(f"{path}: {field} sets {o!r}; the plan's lrs and seeds set it")
    return Plan(
        name=path.stem,
        description=str(data.get("description") or ""),
        base=base,
        arms=arms,
        lrs=lrs,
        seeds=numbers("seeds", int) if "seeds" in data else (0,),
        series=strings(data.get("series"), "series"),
        sizes=sizes,
    )


# --- one run ----------------------------------------------------------------------------------


def summarize(
    spec: RunSpec,
    plan: str,
    run: Run,
    max_steps: int,
    warmup_steps: int,
    stopped_early: bool,
    cost: dict[str, float],
    non_embedding_params: int,
) -> dict[str, Any]:
    """The summary row of one finished run, from its logged history; ``cost`` holds the
    ``cpu_s``, ``wall_s`` and ``load_avg_1m`` columns."""
    init, final = init_loss(run).value, final_loss(run)
    path = run_trajectory(run, init, final.value, warmup_steps)
    peak = max_attention_logit(run)
    entropies = [
        v
        for _, (_, values) in run.layer_series("attn", "entropy").items()
        for v in values
        if math.isfinite(v)
    ]
    _, lse = run.series(_LSE_KEY)
    finite_lse = lse[np.isfinite(lse)]
    return {
        "plan": plan,
        "arm": spec.label,
        "lr": spec.lr,
        "seed": spec.seed,
        "size": spec.size,
        "non_embedding_params": non_embedding_params,
        "run_id": spec.run_id,
        "steps": run.final_step,
        "max_steps": max_steps,
        "init_loss": init,
        "final_loss": final.value,
        "final_from": final.how,
        "stopped_early": stopped_early,
        "diverged": is_diverged(path, final.value, init, stopped_early),
        "diverged_by_final": ended_diverged(final.value, init, stopped_early),
        **{column: getattr(path, name) for column, name in _TRAJECTORY_COLUMNS.items()},
        "peak_attn_logit": peak[0] if peak else math.nan,
        "peak_attn_logit_layer": peak[1] if peak else -1,
        "peak_attn_logit_step": peak[2] if peak else -1,
        "min_attn_entropy": min(entropies) if entropies else math.nan,
        "peak_abs_logsumexp": float(np.abs(finite_lse).max()) if finite_lse.size else math.nan,
        "final_logsumexp": float(lse[-1]) if lse.size else math.nan,
        "spike_score_loss": run.last("stability/spike_score_loss"),
        "spike_score_grad": run.last("stability/spike_score_grad"),
        **{key: round(cost[key], 2) for key in ("cpu_s", "wall_s", "load_avg_1m")},
        "overrides": " ".join(spec.overrides),
    }


def train_run(
    spec: RunSpec, plan: str, run_dir: Path, wandb: WandbLabels | None = None
) -> dict[str, Any]:
    """Train ``spec`` in this process into a fresh ``run_dir``; return its summary row.

    A run that stops on non-finite steps (``TrainingDiverged``) is a result, not an error.
    ``wandb``: log the run to wandb, as this labels its logger (``study_wandb.run_labels``).
    """
    import torch

    from olmo_mini.config import compose_config
    from olmo_mini.model import OLMo2
    from olmo_mini.training.module import TrainingDiverged
    from olmo_mini.training.run import train

    config = compose_config(list(spec.overrides))
    if wandb is not None:
        config.logger = wandb(spec, config.logger)
    load = os.getloadavg()[0]
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    stopped_early = False
    try:
        train(config, run_dir)
    except TrainingDiverged as err:
        log.info("%s: %s", spec.run_id, err)
        stopped_early = True
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    cost = {"cpu_s": cpu, "wall_s": time.perf_counter() - start, "load_avg_1m": load}
    run = load_run_dir(run_dir)
    max_steps, warmup = config.trainer.max_steps, config.optim.warmup_steps
    with torch.device("meta"):
        params = OLMo2(config.model).num_params(exclude_embeddings=True)
    return summarize(spec, plan, run, max_steps, warmup, stopped_early, cost, params)


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """A run's summary row when the run completed, else None."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    return {
        **dict.fromkeys(FIELDS),
        **_SIZE_DEFAULTS,
        **legacy_columns(json.loads(path.read_text())),
    }


def legacy_columns(row: dict[str, Any]) -> dict[str, Any]:
    """A row from before the trajectory columns (a CSV line or a ``result.json``): its
    ``diverged`` was judged on the final loss only, so it is also ``diverged_by_final``; the
    trajectory columns stay absent (None)."""
    if "diverged_by_final" not in row and "diverged" in row:
        return {**row, "diverged_by_final": row["diverged"]}
    return row


def check_runs(plan: Plan) -> None:
    """Compose every run's config before the first one trains, so that a misspelled override
    stops the study at once with one line rather than after the runs before it."""
    from olmo_mini.config import ConfigError, compose_checked

    for spec in plan.runs():
        try:
            compose_checked(spec.overrides)
        except ConfigError as err:
            raise StudyError(f"plan {plan.name!r}, arm {spec.label}: {err}") from None


def run_plan(
    plan: Plan, out: Path, wandb: WandbLabels | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Run every incomplete run of ``plan`` under ``out`` (``wandb``: each logged to wandb, as
    in ``train_run``); return the completed rows and how many ran here.

    A run dir without ``result.json`` is what a killed study left behind: it is removed and
    the run starts again from scratch, so no run ever continues another launch's files. Each
    run is claimed with ``<run_id>.lock`` (the owner's pid), so several processes can work
    through one plan side by side, each skipping the runs another live one is training.
    """
    check_runs(plan)
    out.mkdir(parents=True, exist_ok=True)
    rows, ran = [], 0
    specs = plan.runs()
    for i, spec in enumerate(specs, start=1):
        run_dir, tag = out / spec.run_id, f"[{i}/{len(specs)}] {spec.run_id}"
        row = read_result(run_dir)
        if row is not None:
            log.info("%s: complete, skipped", tag)
            rows.append(row)
            continue
        lock = out / f"{spec.run_id}.lock"
        if try_lock(lock) is not None:
            log.info("%s: another process is training it", tag)
            continue
        try:
            if (row := read_result(run_dir)) is None:  # not finished by another meanwhile
                if run_dir.exists():
                    log.info("%s: incomplete (no %s); starting it again", run_dir, RESULT_FILE)
                    shutil.rmtree(run_dir)
                log.info("%s", tag)
                row = train_run(spec, plan.name, run_dir, wandb)
                write_text_atomic(run_dir / RESULT_FILE, json.dumps(row, indent=1))
                ran += 1
                done = "%s: final loss %.4f, max train loss %.4g, diverged %s, %.0f s CPU"
                values = (row["final_loss"], row["max_train_loss"], row["diverged"], row["cpu_s"])
                log.info(done, tag, *values)
        finally:
            unlock(lock)
        rows.append(row)
    return rows, ran


# --- reading and aggregating rows ---------------------------------------------------------------


def write_rows(rows: Iterable[Mapping[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in FIELDS})
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Summary rows from a plan's CSV, typed as ``summarize`` wrote them. A CSV from before the
    trajectory columns reads with them None and ``diverged_by_final`` = its ``diverged`` (then
    judged on the final loss only); one from before plans had sizes, with no size and no
    parameter count."""
    parse: dict[str, Callable[[str], Any]] = dict.fromkeys(FIELDS, float)
    parse |= dict.fromkeys(("plan", "arm", "size", "run_id", "final_from", "overrides"), str)
    integers = ("seed", "steps", "max_steps", "peak_attn_logit_layer", "peak_attn_logit_step")
    integers += ("non_embedding_params",)
    integers += ("max_train_loss_step", "non_finite_steps", "steps_above_init", "first_above_init")
    parse |= dict.fromkeys(integers, int)
    flags = ("stopped_early", "diverged", "diverged_by_final", "recovered")
    parse |= dict.fromkeys(flags, lambda value: value == "True")
    rows = []
    with path.open(newline="") as f:
        for line, raw in enumerate(csv.DictReader(f), start=2):
            raw = legacy_columns(raw)
            optional = TRAJECTORY_FIELDS if "max_train_loss" not in raw else ()
            missing = [
                k for k in FIELDS if k not in raw and k not in optional and k not in _SIZE_DEFAULTS
            ]
            if missing:
                raise StudyError(f"{path}:{line}: missing columns {missing}")
            absent = [k for k in (*TRAJECTORY_FIELDS, "non_embedding_params") if raw.get(k) == ""]
            raw = {k: v for k, v in raw.items() if k not in absent}
            defaults = {**dict.fromkeys(FIELDS), **_SIZE_DEFAULTS}
            rows.append({k: parse[k](raw[k]) if k in raw else defaults[k] for k in FIELDS})
    return rows


@dataclass
class ArmResult(Arm[Mapping[str, Any]]):
    """One arm over its LR grid (one seed): the Wortsman et al. numbers (``Arm``, whose runs
    are the summary rows) and the worst metrics over its runs."""

    arm: str
    seed: int
    peak_attn_logit: float
    min_attn_entropy: float
    peak_abs_logsumexp: float
    max_spike_score_loss: float
    max_spike_score_grad: float
    max_share_above_init: float  # NaN when the rows predate the trajectory columns
    diverged_by_final_lrs: list[float]


def _nanmax(values: Iterable[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else math.nan


def arm_results(rows: Sequence[Mapping[str, Any]]) -> list[ArmResult]:
    """Rows grouped by (arm, seed), scored, ranked by LR sensitivity (lowest first)."""
    multi_seed = len({r["seed"] for r in rows}) > 1
    grid = [
        GridRun(
            f"{r['arm']} (seed {r['seed']})" if multi_seed else r["arm"],
            r["lr"],
            r["init_loss"],
            r["final_loss"],
            r["diverged"],
            r["run_id"],
            r,
        )
        for r in rows
    ]
    try:
        arms = score_arms(grid)
    except ValueError as err:
        raise StudyError(str(err)) from None
    results = []
    for scored in arms:
        members = list(scored.runs.values())
        results.append(
            ArmResult(
                **vars(scored),
                arm=members[0]["arm"],
                seed=members[0]["seed"],
                peak_attn_logit=_nanmax(r["peak_attn_logit"] for r in members),
                min_attn_entropy=-_nanmax(-r["min_attn_entropy"] for r in members),
                peak_abs_logsumexp=_nanmax(r["peak_abs_logsumexp"] for r in members),
                max_spike_score_loss=_nanmax(r["spike_score_loss"] for r in members),
                max_spike_score_grad=_nanmax(r["spike_score_grad"] for r in members),
                max_share_above_init=_nanmax(r["share_above_init"] for r in members),
                diverged_by_final_lrs=[
                    lr for lr, r in scored.runs.items() if r["diverged_by_final"]
                ],
            )
        )
    return sorted(results, key=lambda a: (a.sensitivity, a.arm, a.seed))


@dataclass(frozen=True)
class SizePoint:
    """One arm of a plan with sizes at one size: its LR sensitivity per seed (each over that
    seed's LR grid) and their mean and sample std, the seed noise of the point."""

    arm: str  # the plan's arm, without the size
    size: str
    non_embedding_params: int
    sensitivities: dict[int, float]  # by seed
    diverged_runs: int  # by the trajectory rule, over every LR and seed
    runs: int

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.sensitivities.values())))

    @property
    def std(self) -> float:
        """The sample std over seeds; NaN with one seed."""
        values = list(self.sensitivities.values())
        return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def size_points(rows: Sequence[Mapping[str, Any]]) -> list[SizePoint]:
    """The rows of a plan with sizes as LR sensitivity against size: a point per (arm, size),
    by arm then by non-embedding parameters; empty when no row has a size."""
    groups: dict[tuple[str, str], list[ArmResult]] = {}
    for result in arm_results([r for r in rows if r["size"]]):
        first = next(iter(result.runs.values()))
        groups.setdefault((_arm_without_size(first), first["size"]), []).append(result)
    points = []
    for (arm, size), results in groups.items():
        members = [r for result in results for r in result.runs.values()]
        params = {r["non_embedding_params"] for r in members}
        if len(params) != 1:
            raise StudyError(f"arm {size_label(size, arm)!r}: runs of {sorted(params)} parameters")
        points.append(
            SizePoint(
                arm=arm,
                size=size,
                non_embedding_params=params.pop(),
                sensitivities={
                    r.seed: r.sensitivity for r in sorted(results, key=lambda r: r.seed)
                },
                diverged_runs=sum(bool(r["diverged"]) for r in members),
                runs=len(members),
            )
        )
    return sorted(points, key=lambda p: (p.arm, p.non_embedding_params))


def seed_spread(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, int, float, float]]:
    """Per (arm, LR) with several seeds: (arm, lr, n, mean final loss, sample std)."""
    groups: dict[tuple[str, float], list[float]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["lr"]), []).append(row["final_loss"])
    return [
        (arm, lr, len(v), float(np.mean(v)), float(np.std(v, ddof=1)))
        for (arm, lr), v in groups.items()
        if len(v) > 1
    ]


def pooled_std(rows: Sequence[Mapping[str, Any]]) -> float:
    """The seed-to-seed std of the final loss pooled over the repeated grid points (the root
    mean of their variances); NaN when no point was repeated."""
    spread = seed_spread(rows)
    if not spread:
        return math.nan
    return math.sqrt(sum(std**2 for *_, std in spread) / len(spread))


def sensitivity_noise(
    finals: Mapping[float, float], init: float, sigma: float, draws: int = 4000, seed: int = 0
) -> float:
    """The std of an arm's LR sensitivity if every final loss moved by independent N(0, sigma)
    seed noise (Monte Carlo): an estimate from the measured final-loss spread, for telling
    which sensitivity gaps a single seed per point can resolve."""
    rng = np.random.default_rng(seed)
    values = np.array(list(finals.values()), dtype=np.float64)
    noisy = values + rng.normal(0.0, sigma, size=(draws, values.size))
    samples = [lr_sensitivity(dict(enumerate(row)), init) for row in noisy]
    return float(np.std(samples))


# --- the report ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _percent(share: float | None) -> str:
    return "—" if share is None or not math.isfinite(share) else f"{100 * share:.0f}%"


def trajectory_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Report lines: the runs whose training loss went above the loss at init after warmup
    (or was non-finite), one row each; one sentence when none did or nothing was recorded."""
    if any(r["max_train_loss"] is None for r in rows):
        return ["", "No trajectory columns in these rows (written before they existed)."]
    excursions = [r for r in rows if r["steps_above_init"] or r["non_finite_steps"]]
    if not excursions:
        return ["", "No run's training loss went above its loss at init after warmup."]
    lines = [
        "",
        "Runs whose training cross-entropy went above the loss at init after warmup:",
        "",
        "| arm | LR | seed | loss at init | max train loss (step) | steps above init (share) | "
        "first above init | non-finite steps | final loss | recovered | diverged | "
        "diverged, final-loss rule |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in sorted(excursions, key=lambda r: (r["arm"], r["lr"], r["seed"])):
        lines.append(
            f"| {r['arm']} | {r['lr']:g} | {r['seed']} | {r['init_loss']:.3f} | "
            f"{_num(r['max_train_loss'])} ({r['max_train_loss_step']}) | "
            f"{r['steps_above_init']} ({_percent(r['share_above_init'])}) | "
            f"{r['first_above_init']} | {r['non_finite_steps']} | {_num(r['final_loss'])} | "
            f"{'yes' if r['recovered'] else 'no'} | {'yes' if r['diverged'] else 'no'} | "
            f"{'yes' if r['diverged_by_final'] else 'no'} |"
        )
    return lines


def report_markdown(
    plan_name: str,
    description: str,
    rows: Sequence[Mapping[str, Any]],
    figures: Sequence[str] = (),
    sigma: float | None = None,
) -> str:
    """The plan's report: the arm table ranked by LR sensitivity, the per-run table, the cost.

    ``sigma``: a seed-to-seed std of the final loss measured elsewhere (another plan); each
    arm's sensitivity then gets the std that noise of that size would give it.
    """
    arms = arm_results(rows)
    multi_seed = len({a.seed for a in arms}) > 1
    lines = [f"# Study plan `{plan_name}`", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [
        "Ranked by LR sensitivity = mean over the LR grid of min(final loss, loss at init) − best "
        "final loss (Wortsman et al. 2023, §2.2). Peak/min columns are over every run of the arm; "
        "spike scores (OLMo 2, % of steps ≥ 7σ from the rolling mean) are the worst run's. "
        "*LRs*: how many LRs of the grid ran; an arm with fewer than the others is incomplete "
        "and its sensitivity, over its own LRs only, is not comparable. *Diverged* (judged on "
        "the trajectory): stopped on non-finite steps, any non-finite training loss, a final "
        "loss above the loss at init, or a training cross-entropy above the loss at init on "
        f"more than {DIVERGED_SHARE_ABOVE_INIT:.0%} of the steps after warmup (*share above "
        "init*, the arm's largest); the final-loss rule alone is beside it."
        + (
            ""
            if sigma is None
            else f" Sensitivities show ± the std that seed noise of {sigma:.3f} nats per final "
            "loss (measured by the seeds plan) would give them."
        ),
        "",
        "| arm |"
        + (" seed |" if multi_seed else "")
        + " LRs | loss at init | best LR | best final "
        "loss | LR sensitivity | peak max attn logit | min attn entropy | peak \\|mean log Z\\| | "
        "spike score loss % | spike score grad % | max share above init | diverged at LR | "
        "diverged at LR, final-loss rule |",
        "|---|"
        + ("---:|" if multi_seed else "")
        + "---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for a in arms:
        diverged = ", ".join(f"{lr:g}" for lr in a.diverged_lrs) or "none"
        by_final = ", ".join(f"{lr:g}" for lr in a.diverged_by_final_lrs) or "none"
        if not math.isfinite(a.max_share_above_init):
            diverged = "— (no trajectory)"
        noise = "" if sigma is None else f" ± {sensitivity_noise(a.finals, a.init_loss, sigma):.3f}"
        lines.append(
            f"| {a.arm} |"
            + (f" {a.seed} |" if multi_seed else "")
            + f" {len(a.finals)} | {a.init_loss:.3f} | {_num(a.best_lr)} | {_num(a.best_loss)} | "
            f"**{a.sensitivity:.3f}**{noise} | {_num(a.peak_attn_logit)} | {_num(a.min_attn_entropy, 3)} | "
            f"{_num(a.peak_abs_logsumexp, 3)} | {_num(a.max_spike_score_loss, 2)} | "
            f"{_num(a.max_spike_score_grad, 2)} | {_percent(a.max_share_above_init)} | "
            f"{diverged} | {by_final} |"
        )
    lines += size_table(size_points(rows))
    spread = seed_spread(rows)
    if spread:
        lines += [
            "",
            "Seed-to-seed spread of the final loss:",
            "",
            "| arm | LR | seeds | mean final loss | std (ddof 1) |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {arm} | {lr:g} | {n} | {mean:.4f} | {std:.4f} |" for arm, lr, n, mean, std in spread
        ]
    lines += trajectory_table(rows)
    lrs = sorted({r["lr"] for r in rows})
    lines += [
        "",
        "Final loss per LR (✗: diverged):",
        "",
        "| arm | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
        "|---|" + "---:|" * len(lrs),
    ]
    for a in arms:
        cells = [
            _num(a.finals[lr]) + (" ✗" if lr in a.diverged_lrs else "") if lr in a.finals else "—"
            for lr in lrs
        ]
        label = f"{a.arm} (seed {a.seed})" if multi_seed else a.arm
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cpu = sum(r["cpu_s"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    loads = [r["load_avg_1m"] for r in rows]
    lines += [
        "",
        f"Cost: {len(rows)} runs, {cpu / 60:.1f} min CPU (user + sys), {wall / 60:.1f} min "
        f"wall; 1-minute load average at run starts {min(loads):.1f}–{max(loads):.1f}.",
    ]
    lines += ["", *[f"![{Path(f).stem}]({f})" for f in figures]]
    return "\n".join(lines) + "\n"


def plot_series(
    key: str, runs: Mapping[str, Run], rows: Sequence[Mapping[str, Any]], path: Path
) -> Path | None:
    """``key`` over steps: a panel per LR, a line per run, colored by arm and dashed by seed.
    None when not logged."""
    by_lr: dict[float, list[tuple[str, int, Run]]] = {}
    for row in sorted(rows, key=lambda r: (r["lr"], r["arm"], r["seed"])):
        run = runs.get(row["run_id"])
        if run is not None and key in run.keys():
            by_lr.setdefault(row["lr"], []).append((row["arm"], row["seed"], run))
    if not by_lr:
        return None
    members = [m for group in by_lr.values() for m in group]
    arms = sorted({arm for arm, _, _ in members})
    seeds = sorted({seed for _, seed, _ in members})
    dashes = ("-", "--", ":", "-.")
    drawn = [run.series(key)[1] for _, _, run in members]  # one axis scale for every panel
    cols = min(4, len(by_lr))
    rows_n = math.ceil(len(by_lr) / cols)
    legend_rows = math.ceil(len(arms) * len(seeds) / 4)
    fig = Figure(figsize=(4.2 * cols, 3.3 * rows_n + 0.25 * legend_rows + 0.3))
    axes = list(fig.subplots(rows_n, cols, squeeze=False, sharey=True).flat)
    for ax, (lr, group) in zip(axes, sorted(by_lr.items()), strict=False):
        for arm, seed, run in group:
            color = line_style(arms.index(arm))["color"]
            dash = dashes[seeds.index(seed) % len(dashes)]
            label = f"{arm} s{seed}" if len(seeds) > 1 else arm
            ax.plot(*run.series(key), color=color, ls=dash, linewidth=1.1, label=label)
        if spans_decades(drawn):
            set_growth_scale(ax, drawn)
        ax.set(title=f"lr={lr:g}", xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
    for ax in axes[len(by_lr) :]:
        ax.axis("off")
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        handles, labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, labels, strict=True):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=4, fontsize=8)
    bottom = (0.25 * legend_rows + 0.3) / fig.get_figheight()
    return save_figure(fig, path, dpi=90, rect=(0, bottom, 1, 1))


def plot_final_loss_by_size(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Final loss (capped at the loss at init, mean over seeds) against peak LR, a panel per
    arm and a line per size, smallest to largest from dark to light: Wortsman et al.'s Fig. 1,
    top."""
    sized = [r for r in rows if r["size"]]
    arms = list(dict.fromkeys(_arm_without_size(r) for r in sized))
    params: dict[str, int] = {}
    for r in sized:
        params[r["size"]] = min(
            params.get(r["size"], r["non_embedding_params"]), r["non_embedding_params"]
        )
    sizes = sorted(params, key=params.__getitem__)
    fig = Figure(figsize=(4.6 * len(arms), 4.4))
    axes = fig.subplots(1, len(arms), sharey=True, squeeze=False)[0]
    for ax, arm in zip(axes, arms, strict=True):
        for i, size in enumerate(sizes):
            by_lr: dict[float, list[float]] = {}
            for r in sized:
                if r["size"] == size and _arm_without_size(r) == arm:
                    by_lr.setdefault(r["lr"], []).append(
                        capped_loss(r["final_loss"], r["init_loss"])
                    )
            lrs = sorted(by_lr)
            color = colormaps["viridis"](0.85 * i / max(1, len(sizes) - 1))
            label = f"{size} ({params[size]:,})"
            ax.plot(lrs, [np.mean(by_lr[lr]) for lr in lrs], marker="o", color=color, label=label)
        ax.set(xscale="log", title=arm, xlabel=f"peak learning rate ({LR_KEY})")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("final loss (capped at the loss at init; mean over seeds)")
    axes[-1].legend(fontsize=8, title="size (non-embedding params)", title_fontsize=8)
    return save_figure(fig, path, dpi=100)


def _arm_without_size(row: Mapping[str, Any]) -> str:
    return row["arm"].removeprefix(f"{row['size']}, ") if row["size"] else row["arm"]


def plot_sensitivity_vs_size(points: Sequence[SizePoint], path: Path) -> Path:
    """LR sensitivity against non-embedding parameters (log axis), a line per arm at the mean
    over seeds with ± one sample std, each seed's value a dot (Wortsman et al.'s Fig. 1)."""
    fig = Figure(figsize=(7, 4.8))
    ax = fig.subplots()
    by_arm: dict[str, list[SizePoint]] = {}
    for point in points:
        by_arm.setdefault(point.arm, []).append(point)
    for i, (arm, line) in enumerate(by_arm.items()):
        x = np.array([p.non_embedding_params for p in line], dtype=np.float64)
        mean = np.array([p.mean for p in line])
        std = np.nan_to_num(np.array([p.std for p in line]))
        style = line_style(i)
        ax.errorbar(x, mean, yerr=std, **style, marker="o", capsize=3, label=arm)
        for p in line:
            values = list(p.sensitivities.values())
            dots = np.full(len(values), float(p.non_embedding_params))
            ax.plot(dots, values, ".", color=style["color"], alpha=0.5)
    ax.set(
        xscale="log",
        xlabel="non-embedding parameters",
        ylabel="LR sensitivity (nats)",
        title="LR sensitivity vs model size (mean ± std over seeds; dots: seeds)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=100)


def size_table(points: Sequence[SizePoint]) -> list[str]:
    """Report lines: LR sensitivity against model size, a row per (arm, size)."""
    if not points:
        return []
    lines = [
        "",
        "LR sensitivity against model size (Wortsman et al. Fig. 1): per seed, each over that "
        "seed's LR grid; mean ± sample std over the seeds:",
        "",
        "| arm | size | non-embedding params | LR sensitivity per seed | mean ± std | "
        "diverged runs |",
        "|---|---|---:|---|---:|---:|",
    ]
    for p in points:
        per_seed = ", ".join(f"{v:.3f}" for _, v in sorted(p.sensitivities.items()))
        lines.append(
            f"| {p.arm} | {p.size} | {p.non_embedding_params:,} | {per_seed} | "
            f"**{p.mean:.3f} ± {_num(p.std, 2)}** | {p.diverged_runs} of {p.runs} |"
        )
    return lines


def render(
    plan: Plan,
    rows: Sequence[Mapping[str, Any]],
    report_dir: Path,
    runs_dir: Path | None = None,
    sigma: float | None = None,
) -> list[Path]:
    """``summary.csv``, the loss-vs-LR figure, the plan's series figures (when the run dirs are
    at hand) and ``<plan>.md`` in ``report_dir``; ``sigma`` as in ``report_markdown``."""
    if not rows:
        raise StudyError(f"plan {plan.name!r}: no completed runs to report")
    report_dir.mkdir(parents=True, exist_ok=True)
    written = [write_rows(rows, report_dir / SUMMARY_FILE)]
    figures = [plot_final_loss_vs_lr(arm_results(rows), report_dir / "final_loss_vs_lr.png")]
    if points := size_points(rows):
        figures.append(plot_final_loss_by_size(rows, report_dir / "final_loss_by_size.png"))
        figures.append(plot_sensitivity_vs_size(points, report_dir / "sensitivity_vs_size.png"))
    if runs_dir is not None and plan.series:
        runs = {r["run_id"]: load_run_dir(runs_dir / r["run_id"]) for r in rows}
        for key in plan.series:
            name = re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_") + ".png"
            path = plot_series(key, runs, rows, report_dir / name)
            if path is not None:
                figures.append(path)
    md = report_dir / f"{plan.name}.md"
    names = [p.name for p in figures]
    md.write_text(report_markdown(plan.name, plan.description, rows, names, sigma))
    return [*written, *figures, md]


def completed_rows(plan: Plan, out: Path) -> list[dict[str, Any]]:
    """The rows of the plan's runs that completed under ``out``, in plan order."""
    return [row for spec in plan.runs() if (row := read_result(out / spec.run_id)) is not None]
