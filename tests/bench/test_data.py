"""The data-pipeline benchmark runs every pipeline on a small corpus and reports each rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMES = [
    "prepare_data (1 procs)",
    "shard loader (0 workers)",
    "shard loader (2 workers)",
    "streaming loader (0 workers)",
    "streaming loader (2 workers)",
    "training fwd+bwd (tiny model, CPU)",
]


@pytest.mark.slow
def test_every_pipeline_is_measured_against_the_yardstick(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    args = ["--max-docs", "300", "--seconds", "0.2", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "| measurement | tokens/s | tokenizers encode_batch just before | ratio |" in lines
    assert lines[-1].startswith("targets: shard loader ≥ 20M tokens/s: ")
    record = json.loads(out.read_text())
    assert set(NAMES) <= set(record)  # plus prepare_data on all cores where there are several
    for name, rates in record.items():
        assert any(line.startswith(f"| {name} | ") for line in lines)
        assert rates["tokens_per_s"] > 0 and rates["yardstick"] > 0
