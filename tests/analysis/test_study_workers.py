"""``tools/study.py --workers N``: N processes share one ``--out``; the run locks give every
run of the plan to exactly one of them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from olmo_mini.analysis.study import RESULT_FILE, load_plan, read_rows

ROOT = Path(__file__).parents[2]
TOOL = ROOT / "tools" / "study.py"


@pytest.mark.slow
def test_two_workers_train_every_run_of_the_tiny_plan_once(tmp_path) -> None:
    out = tmp_path / "study"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--plan", "tiny", "--out", str(out), "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = [spec.run_id for spec in load_plan("tiny").runs()]
    # "w<k> <time> [i/4] <run id>: final loss ...": one line per run trained, by either worker.
    trained = re.findall(r"^(w[12]) \S+ \[\d/4\] (\S+): final loss", result.stdout, re.M)
    assert sorted(run_id for _, run_id in trained) == sorted(expected)  # none twice, none missing
    assert {worker for worker, _ in trained} == {"w1", "w2"}  # both did some
    assert Counter(p.parent.name for p in out.glob(f"*/{RESULT_FILE}")) == Counter(expected)
    for run_id in expected:  # one launch each: a second trainer would have added version_1
        assert [p.name for p in (out / run_id / "csv").iterdir()] == ["version_0"]
    assert [r["run_id"] for r in read_rows(out / "report" / "summary.csv")] == expected
    assert "plan tiny: 4 of 4 runs complete, 4 trained now by 2 workers" in result.stdout
    threads = max(1, (os.cpu_count() or 1) // 2)  # cores/N each
    assert f"1 cpu process, {threads} thread{'s' if threads > 1 else ''} each" in result.stdout
    noise = ("GPU available", "TPU available", "litlogger", "LeafSpec", "`Trainer.fit` stopped")
    assert not [n for n in noise if n in result.stdout + result.stderr]
