"""The training config tree: one dataclass per Hydra group, validated before any real work.

``configs/train.yaml`` composes the groups; the dataclasses here are registered with Hydra's
ConfigStore as the schema (``train_schema``), so a misspelled key or a value of the wrong type
fails while Hydra composes. Rules that span fields or groups run when ``load_config`` turns the
composed ``DictConfig`` into a ``TrainConfig``; every failure is one ``ConfigError`` whose message
names the field (``trainer.precision``, ``data.global_batch_size``, ...) and the rule.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from olmo_mini.data.config import DataConfig
from olmo_mini.model.config import OLMo2Config
from olmo_mini.stability.config import StabilityConfig
from olmo_mini.validation import ConfigError, at_least, in_range, one_of, positive

# wandb's limits: characters a project or entity name may not hold, and a tag's length.
WANDB_PATH_CHARS = "/\\#?%:"
WANDB_TAG_LENGTH = 64


@dataclass
class ModelConfig(OLMo2Config):
    """The ``model`` group: the architecture (``OLMo2Config``) plus how the trainer builds it."""

    # torch.compile for training: the whole model with its loss as one graph (one device or DDP);
    # each block under FSDP or activation checkpointing (the root's hooks break the graph there).
    compile: bool = False
    # Start from these weights instead of a random init: a training checkpoint or run dir or a
    # Hugging Face Olmo2 folder (olmo_mini.interop).
    init_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_from is not None and not Path(self.init_from).expanduser().exists():
            raise ConfigError(f"model.init_from: {self.init_from!r} does not exist")


@dataclass
class OptimConfig:
    """AdamW with OLMo 2's groups (no weight decay on the embedding only), warmup + cosine or
    constant."""

    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # coupled: AdamW's θ ← θ − lr_t·weight_decay·θ. independent (Wortsman et al. 2023):
    # θ ← θ − (lr_t / lr)·weight_decay·θ, not scaled by the peak LR (they use 1e-4, not 0.1).
    weight_decay_mode: str = "coupled"
    # Decay the token embedding too (Wortsman et al. decay every weight); OLMo 2 exempts it.
    embedding_weight_decay: bool = False
    warmup_steps: int = 20
    # After the linear warmup: cosine (to the minimum LR at trainer.max_steps) or constant
    # (the peak LR held to the end).
    schedule: str = "cosine"
    # The cosine ends at min_lr_ratio * lr, or at min_lr when set (absolute: Wortsman et al.
    # decay to 1e-5 whatever the peak, so an LR sweep keeps one end point).
    min_lr_ratio: float = 0.1
    min_lr: float | None = None
    # Global-norm gradient clipping at this norm; null: no clipping (the norm is still logged).
    grad_clip: float | None = 1.0
    z_loss: float = 1e-5
    # Non-finite loss or grad norm skips the step; this many in a row stops the run.
    max_consecutive_skips: int = 5
    # QK-Clip (Kimi K2): after each step, shrink W_q/W_k of every head whose max attention
    # logit in that step's forward exceeded tau, by tau / max logit; null: off. K2 used 100.
    qk_clip_tau: float | None = None

    def __post_init__(self) -> None:
        one_of("optim", self, "weight_decay_mode", ("coupled", "independent"))
        one_of("optim", self, "schedule", ("cosine", "constant"))
        positive("optim", self, "lr", "eps", "grad_clip", "qk_clip_tau")
        at_least("optim", self, 0, "weight_decay", "z_loss", "warmup_steps")
        at_least("optim", self, 1, "max_consecutive_skips")
        in_range("optim", self, 0, 1, "beta1", "beta2", "min_lr_ratio")
        in_range("optim", self, 0, "lr", "min_lr")

    @property
    def final_lr_ratio(self) -> float:
        """Where the cosine ends, as a multiple of the peak LR."""
        return self.min_lr_ratio if self.min_lr is None else self.min_lr / self.lr


@dataclass
class TrainerConfig:
    """Devices, parallelism, precision and loop lengths; names follow Lightning's Trainer."""

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    # single: one device; ddp: replicated params; fsdp: FSDP2 fully_shard per block + root.
    strategy: str = "single"
    # auto: bf16-mixed on GPUs and on CPUs with native bf16 matmuls (AVX512-BF16/AMX), else 32-true.
    precision: str = "auto"
    max_steps: int = 150
    # Stop early at this step; the LR schedule still spans max_steps (for stop/resume tests).
    stop_at_step: int | None = None
    val_check_interval: int = 50
    log_every_n_steps: int = 10
    activation_checkpointing: bool = False
    # Peak FLOP/s for perf/mfu; null = a known GPU's dense datasheet figure (Lightning's table
    # for others), or a measured matmul peak on CPU.
    peak_flops: float | None = None
    # torch's intra-op threads per process on CPU; null: OMP_NUM_THREADS if set, else this
    # process's share of the idle cores (olmo_mini/startup.py; measurements: docs/performance.md).
    cpu_threads: int | None = None
    progress_bar: bool = True
    sample_prompt: str = "def "
    sample_new_tokens: int = 48

    def __post_init__(self) -> None:
        one_of("trainer", self, "accelerator", ("auto", "cpu", "gpu"))
        one_of("trainer", self, "strategy", ("single", "ddp", "fsdp"))
        one_of("trainer", self, "precision", ("auto", "32-true", "bf16-mixed", "bf16-true"))
        steps = ("max_steps", "val_check_interval", "log_every_n_steps")
        positive("trainer", self, "devices", "num_nodes", *steps, "cpu_threads", "peak_flops")
        at_least("trainer", self, 0, "sample_new_tokens")
        in_range("trainer", self, 1, "max_steps", "stop_at_step")
        if self.strategy == "single" and self.devices * self.num_nodes != 1:
            raise ConfigError(
                f"trainer.devices × trainer.num_nodes ({self.devices} × {self.num_nodes}) must be 1 "
                "with trainer.strategy=single; use trainer=ddp or trainer=fsdp for more"
            )

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


@dataclass
class LoggerConfig:
    """Extra logger beside the always-on CSV file. A wandb run is named, grouped and tagged from
    the run dir, the sweep and the overrides unless these say otherwise (docs/wandb.md)."""

    kind: str = "none"
    project: str = "olmo-mini"
    # null: wandb's default entity (WANDB_ENTITY, else the logged-in user's).
    entity: str | None = None
    # null: the run dir's name (a sweep job: its overrides, else <sweep dir name>/<job number>).
    name: str | None = None
    # null: the sweep dir of a -m sweep, else the experiment (+experiment=...), else none.
    group: str | None = None
    # Added to the tags made from the command line's overrides (e.g. lr=1e-3, qk_norm=none).
    tags: list[str] = field(default_factory=list)
    # null: as wandb decides (WANDB_MODE, `wandb offline`), online where `wandb login`,
    # WANDB_API_KEY or a settings file gives credentials, else offline.
    mode: str | None = None

    def __post_init__(self) -> None:
        one_of("logger", self, "kind", ("none", "wandb"))
        one_of("logger", self, "mode", ("online", "offline", "disabled"))
        for name in ("project", "entity"):  # parts of wandb's run path entity/project/id
            value = getattr(self, name)
            if value is not None and (not value or set(value) & set(WANDB_PATH_CHARS)):
                raise ConfigError(
                    f"logger.{name} must be a non-empty name without any of "
                    f"{WANDB_PATH_CHARS!r}, got {value!r}"
                )
        for name in ("name", "group"):
            if getattr(self, name) == "":
                raise ConfigError(f"logger.{name} must not be empty (null: the default)")
        for tag in self.tags:
            if not 0 < len(tag) <= WANDB_TAG_LENGTH:
                raise ConfigError(
                    f"logger.tags: each tag must be 1 to {WANDB_TAG_LENGTH} characters, got {tag!r}"
                )


@dataclass
class CheckpointConfig:
    """Atomic checkpoints under ``<run_dir>/checkpoints/step_<N>``, verified on resume."""

    # 0: no periodic checkpoints (save_final and a signal still save).
    every_n_steps: int = 100
    keep_last: int = 2
    # Also save when training ends (max_steps or stop_at_step), so a finished run can be extended.
    save_final: bool = True
    # A fresh run in a run dir holding another run's checkpoints deletes them instead of stopping.
    overwrite: bool = False
    # Besides SIGTERM and SIGINT, this signal saves and stops (and requeues under SLURM); null: off.
    requeue_signal: str | None = "SIGUSR1"

    def __post_init__(self) -> None:
        at_least("checkpoint", self, 0, "every_n_steps")
        at_least("checkpoint", self, 1, "keep_last")
        one_of("checkpoint", self, "requeue_signal", ("SIGUSR1", "SIGUSR2", "SIGHUP"))


@dataclass
class ClusterConfig:
    """What each job of a ``cluster=slurm`` sweep asks SLURM for; the values are in
    ``configs/cluster/slurm.yaml``, which hands them to Hydra's submitit launcher and sets
    ``trainer.num_nodes`` and ``trainer.devices`` (one task per GPU) from them."""

    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int
    time_min: int
    partition: str | None
    account: str | None

    def __post_init__(self) -> None:
        positive("cluster", self, "nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "time_min")


@dataclass
class TrainConfig:
    """The whole run: one field per group, the seed and where to resume from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    # null unless cluster=slurm (configs/cluster/).
    cluster: ClusterConfig | None = None
    # Weights and data order.
    seed: int = 0
    # null: fresh start; auto: newest complete checkpoint under <run dir>/checkpoints (else
    # fresh); or a checkpoint directory, e.g. outputs/<run>/checkpoints/step_100.
    resume: str | None = None

    def __post_init__(self) -> None:
        """Rules that span groups."""
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) must be ≤ model.max_seq_len "
                f"({self.model.max_seq_len})"
            )
        try:
            self.data.grad_accum_steps(self.trainer.world_size)
        except ValueError as e:
            raise ConfigError(f"{e} (world size = trainer.devices × trainer.num_nodes)") from None
        if self.resume not in (None, "auto") and not Path(self.resume).exists():
            raise ConfigError(
                f"resume: checkpoint {self.resume!r} does not exist (give a step_<N> directory, "
                "'auto' or null)"
            )

    @property
    def grad_accum_steps(self) -> int:
        return self.data.grad_accum_steps(self.trainer.world_size)


def load_config(cfg: DictConfig | dict[str, Any]) -> TrainConfig:
    """Validate a composed config and return it as dataclasses, or raise one ``ConfigError``."""
    _reject_unknown_keys(cfg, TrainConfig, "")
    try:
        node = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return OmegaConf.to_object(node)  # runs every dataclass's __post_init__
    except OmegaConfBaseException as e:
        where = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(where + str(getattr(e, "msg", e)).splitlines()[0]) from None


def _reject_unknown_keys(cfg: DictConfig | dict[str, Any], schema: type, prefix: str) -> None:
    """A key the schema does not have (a ``+key`` override, a typo in a yaml file) stops with the
    close matches: it would otherwise be stored and silently ignored."""
    hints = typing.get_type_hints(schema)
    for key in cfg:
        if prefix == "" and key == "hydra":
            continue
        name = f"{prefix}{key}"
        if key not in hints:
            raise _no_such_key(str(key), hints, prefix)
        sub = _dataclass_of(hints[key])
        value = cfg[key] if not isinstance(cfg, DictConfig) else cfg._get_node(key)
        if sub is not None and isinstance(value, (dict, DictConfig)) and not _is_none(value):
            _reject_unknown_keys(value, sub, f"{name}.")


def unknown_key_error(full_key: str) -> ConfigError:
    """The error for ``full_key`` (``trainer.max_step``), which names no field of the schema,
    with the close matches."""
    *parents, key = full_key.split(".")
    schema: Any = TrainConfig
    for i, part in enumerate(parents):
        schema = _dataclass_of(typing.get_type_hints(schema).get(part, None))
        if schema is None:
            return ConfigError(f"{'.'.join(parents[: i + 1])}: no such config section")
    prefix = "".join(f"{p}." for p in parents)
    return _no_such_key(key, typing.get_type_hints(schema), prefix)


def _no_such_key(key: str, hints: dict[str, Any], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(hints), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"{prefix}{key}: no such config key{hint}")


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass in a field's type (``X`` or ``X | None``), if any."""
    return next((t for t in (hint, *typing.get_args(hint)) if is_dataclass(t)), None)


def _is_none(value: object) -> bool:
    return isinstance(value, DictConfig) and value._is_none()


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """``configs/train.yaml`` with command-line style overrides, as ``train.py`` would see it
    (for tools and tests that run the trainer in process)."""
    return load_config(compose_unchecked(overrides))


def compose_unchecked(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed ``DictConfig`` before the rules that span fields (``load_config``) run."""
    from hydra import compose, initialize_config_dir

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def reject_repeated_overrides(overrides: Sequence[str]) -> None:
    """A key given twice on one command line (``optim.lr=1e-3 optim.lr=2e-3``) is a slip that
    Hydra settles silently (the last wins): refuse it, naming both."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    seen: dict[tuple[str, str | None], str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = (override.key_or_group, override.package)
        if key in seen:
            raise ConfigError(
                f"{override.get_key_element().lstrip('+~')} is given twice ({seen[key]}, "
                f"{override.input_line}): keep one"
            )
        seen[key] = override.input_line


def override_error(e: Exception) -> str:
    """One line for Hydra's composition error ``e``: what was overridden and why it failed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return str(unknown_key_error(cause.full_key))  # with the close matches
    first, _, rest = str(e).partition("\n")
    if isinstance(e, OverrideParseException):  # bad syntax; the rest links Hydra's grammar docs
        return f"{first} ({rest.strip()})"
    if "To append to your default list use " in rest:  # a group train.yaml does not list
        added = rest.split("To append to your default list use ")[1].split()[0]
        group = added.removeprefix("+").split("=")[0]
        return f"{added[1:]}: {group} is not in train.yaml's defaults; add it with {added}"
    if isinstance(e, MissingConfigException) and "Available options" in rest:
        options = rest.split("Config search path:")[0].split(":", 1)[1].split()
        return f"{first}; available: {', '.join(options)}"
    what = first.removeprefix("Error merging override ").rstrip(".")
    if isinstance(cause, OmegaConfBaseException):
        return f"{what}: {str(getattr(cause, 'msg', cause)).splitlines()[0]}"
    return what


def compose_checked(overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """``compose_config``, with Hydra's own errors (an unknown key, group or option, bad
    syntax) turned into one ``ConfigError`` worded as ``train.py`` words it (close matches)."""
    from hydra.errors import HydraException

    try:
        return compose_config(overrides)
    except HydraException as e:
        raise ConfigError(override_error(e)) from None


def compose_or_exit(overrides: list[str]) -> TrainConfig:
    """The config of ``train.py`` ``overrides``, or exit with one ``error:`` line (for tools)."""
    try:
        reject_repeated_overrides(overrides)
        return compose_checked(overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def register_configs() -> None:
    """Make ``train_schema`` (the ``TrainConfig`` tree) available to ``configs/train.yaml``."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_configs()
