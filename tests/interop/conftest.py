"""Two tiny trained runs shared by the interop tests: one process, and FSDP over two."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.helpers import SMALL, check, run_train

RUN = [*SMALL, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.accelerator=cpu",
       "stability.enabled=false"]


@pytest.fixture(scope="session")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    check(run_train(run_dir, *RUN))
    return run_dir


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp")
    check(run_train(run_dir, *RUN, "trainer=fsdp", "trainer.devices=2"))
    return run_dir
