"""``tools/gpu_check.py`` where there is no GPU: one clear line, a failing exit code. (The CPU
side of the GPU tier; the tier itself is in test_gpu.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from olmo_mini.bench.gpu_check import NO_GPU, Part, summary
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
    def norm(provider: str, gbps: str) -> dict[str, str]:
        return {
            "op": "rms_norm",
            "pass_": "fwd",
            "provider": provider,
            "m": "16384",
            "d": "4096",
            "gbps": gbps,
            "pct_clone": "83.2",
        }

    parts = {
        "tests": Part(False, 200.4, ""),
        "syncs": Part(True, 30.0, ""),
        "aot": Part(None, 0.0, ""),
        "bench_norm": Part(True, 20.0, ""),
    }
    gib = 2**30
    text = summary(
        "NVIDIA H100 80GB HBM3",
        parts,
        {
            "tests": [
                ("test_gpu::test_custom_ops_pass_opcheck", "passed"),
                ("test_gpu::test_x", "FAILED"),
            ],
            "syncs": [("test_train::test_no_host_sync_outside_logging_steps", "passed")],
        },
        [norm("triton", "2500.4"), norm("compile", "2000.0"), norm("torch", "900.2")],
        {
            "olmo2_1b": [
                {
                    "framework": "olmo-mini",
                    "mode": "bf16+compile",
                    "tokens_per_s": 41234.5,
                    "mfu": 0.4012,
                    "peak_step_mem_mib": 12345.4,
                }
            ]
        },
        {"peak_bytes": 30 * gib},
        {"total": 33 * gib},
        {"trace": {"peak": 40 * gib}, "plan": {"total": 38 * gib}},
    )
    assert "# GPU check: NVIDIA H100 80GB HBM3" in text
    assert "| tests | FAILED | 200 |" in text and "| syncs | ok | 30 |" in text
    assert "| aot | not run | 0 |" in text
    assert "not run: tests/kernels/test_aot_compile.py is not in this checkout" in text
    assert "| test_gpu::test_x | FAILED |" in text
    assert "| test_train::test_no_host_sync_outside_logging_steps | passed |" in text
    assert "| rms_norm | fwd | 16384 | 4096 | 2500 | 2000 | 900 | 1.25 | 83 |" in text
    assert "## Training step, olmo2_1b shape (4 x 2048 tokens), one GPU" in text
    assert "| olmo-mini | bf16+compile | 41234 | 40.1% | 12345 |" in text
    assert "max_memory_allocated | 30.00 | 33.00 | +10 % |" in text
    assert "rank 0's peak | 40.00 | 38.00 | -5 % |" in text
