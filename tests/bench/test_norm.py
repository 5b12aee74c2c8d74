"""The norm benchmark: its CLI without a GPU, and its sweep and report code on CPU."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from olmo_mini import kernels
from olmo_mini.bench import norm

ROOT = Path(__file__).resolve().parents[2]


def test_cli_without_gpu_exits_zero(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_norm.py"), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert norm.NO_GPU_MESSAGE in proc.stdout
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(kernels.triton_norm is None, reason="triton is not installed")
def test_sweep_and_report_on_cpu(tmp_path: Path) -> None:
    """Every op, pass and eager provider runs (Triton through the interpreter); files written.

    A fixed 1 ms stand-in for do_bench makes GB/s pure arithmetic on the traffic model.
    """
    calls = []

    def timer(fn, grad_to_none):
        fn()
        calls.append(len(grad_to_none))
        return 1.0

    providers = ("triton", "torch", "F.rms_norm")
    kernels.triton_norm.LAUNCHES.clear()
    results = norm.sweep([8], [64], norm.OPS, providers, "cpu", timer, clone_gbps=1.0)
    assert len(results) == len(norm.OPS) * len(providers) * len(norm.PASSES)
    assert kernels.triton_norm.LAUNCHES["qk_rms_norm_bwd"] == 2  # bwd and fwd+bwd timings
    fwd = next(r for r in results if (r.op, r.pass_) == ("add_rms_norm", "fwd"))
    assert fwd.gbps == pytest.approx(3 * 8 * 64 * 2 / 1e-3 / 1e9)
    assert fwd.pct_clone == pytest.approx(100 * fwd.gbps)
    norm.write_report(results, 1.0, "cpu", tmp_path)
    with open(tmp_path / "norm_bench.csv") as f:
        reader = csv.DictReader(f)
        assert len(list(reader)) == len(results)
    # The columns tools/gpu_check.py reads back.
    assert reader.fieldnames == ["op", "pass_", "provider", "m", "d", "ms", "gbps", "pct_clone"]
    assert "| qk_rms_norm | fwd+bwd | triton | 8 | 64 |" in (tmp_path / "norm_bench.md").read_text()
    assert (tmp_path / "norm_bench.png").stat().st_size > 0
