"""Bad input fails fast, before any model or data work, with one message naming the field."""

import time

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from olmo_mini.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    StabilityConfig,
    TrainerConfig,
)
from olmo_mini.model.config import SIZES
from tests.training.helpers import REPO, compose_config, run_train


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.d_model=250"], "d_model (250) must be divisible by n_heads"),
        (["data.global_batch_size=30"], "data.global_batch_size (30) must be divisible"),
        (
            ["trainer=fsdp", "trainer.devices=3"],
            "data.global_batch_size (32) must be divisible by data.micro_batch_size × world size",
        ),
        (["data.seq_len=2048"], "data.seq_len (2048) must be ≤ model.max_seq_len (1024)"),
        (["trainer.precision=fp8"], "trainer.precision must be one of"),
        (["trainer.strategy=zero3"], "trainer.strategy must be one of"),
        (["optim.lr=0"], "optim.lr must be a positive number"),
        (["optim.lr=-1e-3"], "optim.lr must be a positive number"),
        (["resume=/does/not/exist"], "resume: checkpoint '/does/not/exist' does not exist"),
        (["trainer.devices=2"], "trainer.devices × trainer.num_nodes (2 × 1) must be 1"),
    ],
)
def test_rule_violations_name_their_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        compose_config(*overrides)
    assert expected in str(info.value)


def test_unknown_keys_and_wrong_types_fail_while_composing():
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        compose_config("optim.lrr=1")
    with pytest.raises(ConfigCompositionException, match="trainer.max_steps"):
        compose_config("trainer.max_steps=many")


def test_cli_prints_one_line_without_traceback(tmp_path):
    start = time.perf_counter()
    result = run_train(tmp_path / "run", "data.global_batch_size=30", timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 1
    assert "error: data.global_batch_size (30) must be divisible" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert elapsed < 60, f"config error took {elapsed:.0f}s"


GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "checkpoint": CheckpointConfig,
    "stability": StabilityConfig,
}


@pytest.mark.parametrize(
    "path",
    [p for group in GROUPS for p in sorted((REPO / "configs" / group).glob("*.yaml"))],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_group_files_hold_only_what_differs_from_the_dataclass_defaults(path):
    """Defaults live in the dataclasses; a model file also names its shape (the point of a
    named size, even where it equals the default shape, as olmo2_tiny does)."""
    values = yaml.safe_load(path.read_text()) or {}
    default = GROUPS[path.parent.name]()
    shape = SIZES if path.parent.name == "model" else ()
    same = [k for k, v in values.items() if k not in shape and getattr(default, k) == v]
    assert not same, f"{path.relative_to(REPO)} restates the defaults of {same}"
