"""The traced step (fake process group, fake tensors, FSDPMemTracker) against the planner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from olmo_mini.bench.trace import PLANNED_AS, trace_memory
from olmo_mini.sizing.memory import plan_memory
from tests.training.helpers import REPO, compose_config

# olmo2_tiny on 4 ranks, 2 x 256 tokens, two micro-batches per step (global batch 16).
TINY = (
    "model=olmo2_tiny",
    "trainer=fsdp",
    "trainer.devices=4",
    "trainer.precision=bf16-mixed",
    "data.micro_batch_size=2",
    "data.seq_len=256",
    "data.global_batch_size=16",
)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_traced_step_adds_up_and_matches_the_plan(checkpointing: bool) -> None:
    config = compose_config(*TINY, f"trainer.activation_checkpointing={checkpointing}")
    trace, plan = trace_memory(config), plan_memory(config)
    assert trace.world_size == 4 and trace.accumulating
    assert trace.activation_checkpointing is checkpointing
    assert sum(trace.categories.values()) == trace.peak
    assert sum(trace.term(name) for name in PLANNED_AS) == trace.peak
    # The states are exact (vocab 4096 and width 256 split evenly over 4); AdamW's step
    # counters (one fp32 scalar per parameter tensor) are not in the plan.
    assert trace.term("params") == plan.params
    assert trace.term("grads") == plan.grads  # the step's earlier micro-batches left them
    tensors = 3 + 11 * 4  # embedding, final norm, head; 11 per block
    assert trace.term("optimizer") == plan.optimizer + 4 * tensors
    # The root (embedding, final norm, head) and one block's all-gather buffer, bf16.
    assert trace.term("fsdp_working_set") == plan.fsdp_working_set
    assert abs(plan.total - trace.peak) <= 0.10 * trace.peak


@pytest.mark.slow
def test_plan_memory_traces_olmo2_1b_on_8_ranks_within_ten_percent() -> None:
    args = [
        "--trace",
        "--json",
        "model=olmo2_1b",
        "trainer=fsdp",
        "trainer.devices=8",
        "trainer.precision=bf16-mixed",
        "data.micro_batch_size=4",
        "data.seq_len=4096",
        "data.global_batch_size=1024",
    ]
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan_memory.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    trace, plan = out["trace"], out["plan"]
    assert trace["world_size"] == 8
    assert trace["categories"]["Sharded Param"] == plan["params"]
    assert abs(plan["total"] - trace["peak"]) <= 0.10 * trace["peak"]
