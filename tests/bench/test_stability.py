"""The monitor-overhead benchmark runs both arms of the real trainer and prints their rates."""

from __future__ import annotations

import json

import pytest

from olmo_mini.bench.stability import main, measure_overhead


@pytest.mark.slow
def test_overhead_benchmark_runs_both_arms(capsys: pytest.CaptureFixture[str]) -> None:
    result = measure_overhead(
        ["debug=smoke", "stability.every_n_steps=2"], steps=4, warmup=1, repeats=1
    )
    assert result.steps_per_s_off > 0 and result.steps_per_s_on > 0
    assert result.tokens_per_step == 8 * 64 and result.every_n_steps == 2
    assert main(["debug=smoke", "--steps", "3", "--warmup", "1", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = lines.index("| monitor | steps/s | tokens/s |")
    assert lines[table - 1].startswith("machine: ") and lines[table + 1] == "|---|---:|---:|"
    assert [line.split(" | ")[0] for line in lines[table + 2 : table + 4]] == ["| off", "| on"]
    assert lines[-2].startswith("overhead at stability.every_n_steps=10: ")
    record = json.loads(lines[-1])
    assert record["overhead"] == pytest.approx(
        1 - record["steps_per_s_on"] / record["steps_per_s_off"]
    )


def test_bad_warmup_is_one_error_line() -> None:
    with pytest.raises(SystemExit, match="^error: need --steps >= 2 and 0 <= --warmup < --steps"):
        main(["--steps", "4", "--warmup", "4"])
