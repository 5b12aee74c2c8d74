"""Bad input fails fast, before any model or data work, with one message naming the field."""

import time

import pytest
from hydra.errors import ConfigCompositionException

from olmo_mini.config import ConfigError
from tests.training.helpers import compose_config, run_train


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
