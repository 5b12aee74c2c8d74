"""The memory planner's terms from the config, and the benchmark's per-rank measurements."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from olmo_mini.sizing.memory import plan_memory
from tests.training.helpers import REPO, compose_config

# debug=smoke's architecture: vocab 4096 (olmo2_tiny), width 64, 2 blocks, SwiGLU hidden 128.
VOCAB, D, LAYERS, HIDDEN = 4096, 64, 2, 128
# Embedding + LM head + final norm; per block q/k/v/o, q/k norms, the three MLP matrices, two norms.
BLOCK = 4 * D * D + 2 * D + 3 * D * HIDDEN + 2 * D
COUNT = 2 * VOCAB * D + D + LAYERS * BLOCK


def test_plan_divides_the_states_by_the_shards_and_counts_adam_moments() -> None:
    one = plan_memory(compose_config("debug=smoke"), "cpu")
    fsdp = plan_memory(compose_config("debug=smoke", "trainer=fsdp", "trainer.devices=2"), "cpu")
    assert one.param_count == fsdp.param_count == COUNT
    assert (one.params, one.grads, one.optimizer) == (4 * COUNT, 4 * COUNT, 8 * COUNT)
    assert (fsdp.params, fsdp.grads, fsdp.optimizer) == (2 * COUNT, 2 * COUNT, 4 * COUNT)
    assert one.fsdp_working_set == 0
    # The root (embedding, final norm, head) and one block's all-gather buffer, fp32.
    assert fsdp.fsdp_working_set == 4 * (2 * VOCAB * D + D + BLOCK)
    tokens = 2 * 64  # micro_batch_size x seq_len
    # Per block 10 widths (block input; q, k before and after QK-norm and RoPE; v; attention,
    # o_proj and MLP outputs; the residual) and 4 SwiGLU tensors, fp32; four norm rstds and a
    # log-sum-exp per head (2 heads) per token; the final norm's input and output.
    per_block = tokens * (4 * (10 * D + 4 * HIDDEN) + 4 * (4 + 2))
    assert one.activations == LAYERS * per_block + 2 * 4 * tokens * D
    assert one.activations_checkpointed == LAYERS * 4 * tokens * D + 2 * 4 * tokens * D
    # fp32: the [V, D] weight gradient and a chunk's matmul result, one [128, V] chunk of
    # softmax, the hidden-state gradient; no dtype-cast copies.
    assert one.lm_head_loss == 8 * VOCAB * D + 4 * tokens * VOCAB + 4 * tokens * D
    assert one.total == 2 * one.params + one.optimizer + one.activations + one.lm_head_loss
    assert one.total == one.total_without_checkpointing  # debug=smoke does not checkpoint
    # With checkpointing: each block's input, the final norm's two, and the larger of one block
    # recomputed and the loss (here the loss) on top of the rest.
    assert one.lm_head_loss > per_block
    assert one.total_with_checkpointing == (
        2 * one.params + one.optimizer + one.activations_checkpointed + one.lm_head_loss
    )


def test_plan_cli_prints_the_table_and_one_line_errors() -> None:
    def plan(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "tools" / "plan_memory.py"), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = plan("model=olmo2_7b", "trainer=fsdp", "trainer.devices=8", "data.global_batch_size=64")
    assert ok.returncode == 0, ok.stderr
    assert "7.299 B parameters, bf16-mixed, 8 device(s)" in ok.stdout
    assert "optimizer state (AdamW)" in ok.stdout
    fits = plan("model=olmo2_7b", "trainer=fsdp", "trainer.devices=8", "data.global_batch_size=64",
                "data.micro_batch_size=2", "data.seq_len=4096", "--device-memory", "40GiB")  # fmt: skip
    assert "total, no checkpointing              61.69 GiB  <- this config" in fits.stdout
    assert "total, checkpointing                 22.16 GiB\n" in fits.stdout
    assert fits.stdout.splitlines()[-1] == (
        "does not fit: 61.69 GiB, 154% of 40.0 GiB per device; with "
        "trainer.activation_checkpointing=true it fits (22.16 GiB, 55% of 40.0 GiB)"
    )
    uneven = plan("model=olmo2_7b", "trainer=fsdp", "trainer.devices=6", "data.micro_batch_size=2",
                  "data.global_batch_size=64", "--device-memory", "80GiB")  # fmt: skip
    assert uneven.returncode == 0, uneven.stderr
    assert uneven.stderr.strip() == (
        "note: data.global_batch_size=64 is no multiple of data.micro_batch_size × world size "
        "(12); planned with the nearest that is, 60"
    )
    assert uneven.stdout.splitlines()[-1].startswith("fits: ")
    bad = plan("model=olmo2_nope")
    assert bad.returncode != 0
    [line] = bad.stderr.strip().splitlines()  # as train.py says it, with the options
    assert line.startswith(
        "error: In 'train': Could not find 'model/olmo2_nope'; available: olmo2_13b, olmo2_1b, "
    )


@pytest.mark.slow
def test_bench_reports_each_rank_holding_half_the_parameters() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "bench_memory.py"),
            "--nproc",
            "2",
            "--stop-after",
            "step",
            "debug=smoke",
            "trainer=fsdp",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for row in rows:
        assert row["world_size"] == 2 and row["stage"] == "step"
        assert row["param_bytes"] == 4 * COUNT
        # Blocks split their matrices' rows evenly; vocab 4096 and width 64 split evenly too.
        assert row["local_param_bytes"] == 2 * COUNT
        # Its half of the parameters, gradients and both AdamW moments, plus 25 step counters.
        assert 8 * COUNT <= row["state_bytes"] <= 8 * COUNT + 8 * 25
        assert row["baseline_rss_bytes"] < row["rss_bytes"] <= row["peak_bytes"]
