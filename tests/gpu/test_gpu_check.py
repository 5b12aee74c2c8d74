"""``tools/gpu_check.py`` where there is no GPU: one clear line, a failing exit code. (The CPU
side of the GPU tier; the tier itself is in test_gpu.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from olmo_mini.bench.gpu_check import NO_GPU, summary
from tests.training.helpers import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_on_a_cpu_machine_exits_with_one_line(tmp_path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out-dir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [NO_GPU]
    assert not any(tmp_path.iterdir())


def test_summary_lists_every_part() -> None:
    text = summary(
        "NVIDIA H100 80GB HBM3",
        [("test_gpu::test_custom_ops_pass_opcheck", "passed"), ("test_gpu::test_x", "FAILED")],
        [
            {
                "op": "rms_norm",
                "pass_": "fwd",
                "m": "16384",
                "d": "4096",
                "gbps": "2500.4",
                "pct_clone": "83.2",
            }
        ],
        [
            {
                "framework": "olmo-mini",
                "mode": "bf16+compile",
                "tokens_per_s": 41234.5,
                "mfu": 0.4012,
            }
        ],
        {"tests": False, "bench_norm": True, "bench_train": True},
    )
    assert "# GPU check: NVIDIA H100 80GB HBM3" in text
    assert "tests FAILED, bench_norm ok, bench_train ok" in text
    assert "| test_gpu::test_x | FAILED |" in text
    assert "| rms_norm | fwd | 16384 | 4096 | 2500 | 83 |" in text
    assert "| olmo-mini | bf16+compile | 41234 | 40.1% |" in text
