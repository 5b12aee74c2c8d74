"""The side-by-side benchmark runs at toy size and prints its table and a JSON record."""

from __future__ import annotations

import json
import math

import pytest

from olmo_mini.bench.train import TrainMode, main


def test_mode_names_round_trip() -> None:
    for mode in (TrainMode(), TrainMode("bf16", True), TrainMode("bf16", False, True)):
        assert TrainMode.parse(mode.name) == mode
    with pytest.raises(ValueError):
        TrainMode.parse("fp16+eager")
    with pytest.raises(ValueError):
        TrainMode.parse("bf16+fast")


def test_toy_benchmark_prints_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    modes = ["fp32+eager", "bf16+eager+full-ce"]
    assert (
        main(
            [
                "--toy",
                "--warmup",
                "1",
                "--repeats",
                "2",
                "--threads",
                "1",
                "--olmo-modes",
                *modes,
                "--hf-modes",
                "fp32+eager",
                "--trainer-steps",
                "4",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("olmo-mini         bf16+eager+full-ce") for line in lines)
    assert any(line.startswith("transformers      fp32+eager") for line in lines)
    assert any(line.startswith("olmo-mini trainer fp32+eager") for line in lines)
    assert any(
        line.startswith("trainer command: python train.py model.d_model=64") for line in lines
    )
    result = json.loads(lines[-1])
    rows = {(r["framework"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == (
        {("olmo-mini", m) for m in modes}
        | {("transformers", "fp32+eager")}
        | {("olmo-mini trainer", "fp32+eager")}
    )
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    trainer = rows[("olmo-mini trainer", "fp32+eager")]
    # 4 trainer steps, each followed by a model-level step; the first step has no start time.
    assert len(trainer["step_s_all"]) == 3 and len(trainer["model_step_s_all"]) == 4
    assert "trainer.precision=32-true" in trainer["command"]
    assert result["ratios"]["trainer_vs_model"] > 0
    assert set(result["ratios"]) == {
        "fp32_eager",
        "fp32_eager_best",
        "fastest",
        "fastest_modes",
        "fastest_best",
        "trainer_vs_model",
    }
    # Same weights and batch: after one AdamW step olmo-mini's CE + z-loss (1e-4 * lse^2,
    # lse ~ ln 4096) is transformers' CE plus about 7e-3, in every mode.
    hf_loss = rows[("transformers", "fp32+eager")]["loss"]
    z = 1e-4 * math.log(4096) ** 2
    assert rows[("olmo-mini", "fp32+eager")]["loss"] == pytest.approx(hf_loss + z, abs=1e-3)
    assert rows[("olmo-mini", modes[1])]["loss"] == pytest.approx(hf_loss + z, abs=5e-3)
