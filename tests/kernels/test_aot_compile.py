"""Every Triton kernel launch of the shipped model configs compiles for sm_80 and sm_90, on CPU.

``olmo_mini.kernels.aot`` records the launches the host functions make on ``meta`` tensors of each
config's real shapes (every dtype class, QK-norm mode, training step and decoded token) and
compiles each distinct one with Triton for the real targets: a kernel the compiler or ptxas
rejects fails here, not on the first GPU. A deliberately broken kernel shows the failure is caught.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (it is on Linux)")

import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from olmo_mini.kernels import aot, triton_norm  # noqa: E402
from olmo_mini.model.config import OLMo2Config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "model"


def compile_kernels(*args: str) -> list[aot.Row]:
    """``tools/compile_kernels.py --json`` in a process without the interpreter: its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tool = [sys.executable, str(ROOT / "tools" / "compile_kernels.py"), "--json"]
    proc = subprocess.run(
        [*tool, "--configs", str(CONFIGS), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,  # a cold Triton cache on a loaded machine
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [
        aot.Row(aot.Compiled(**row["compiled"]), row["dtype"], row["uses"])
        for row in json.loads(proc.stdout)
    ]


@pytest.fixture(scope="module")
def rows() -> list[aot.Row]:
    """The whole table for the NVIDIA targets, compiled once for the module."""
    return compile_kernels("--targets", *aot.NVIDIA_TARGETS)


def test_shipped_shapes_match_the_model_configs() -> None:
    """The plain-YAML reading gives the widths ``OLMo2Config`` gives (kernels import no model)."""
    shapes = aot.shipped_shapes(CONFIGS)
    assert [s.name for s in shapes] == [
        "olmo2_tiny", "olmo2_small", "olmo2_1b", "olmo2_7b", "olmo2_13b", "olmo2_32b",
    ]  # fmt: skip
    for shape in shapes:
        config = OLMo2Config.from_yaml(CONFIGS / f"{shape.name}.yaml")
        assert (shape.d_model, shape.n_heads, shape.n_kv_heads, shape.seq_len) == (
            config.d_model,
            config.n_heads,
            config.n_kv_heads,
            config.max_seq_len,
        )


def test_every_kernel_compiles_for_sm80_and_sm90(rows: list[aot.Row]) -> None:
    kernels = {r.compiled.kernel for r in rows}
    assert kernels == {
        "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_qk_fwd_kernel", "_qk_bwd_kernel",
    }  # fmt: skip
    for target in aot.NVIDIA_TARGETS:
        for dtype in aot.DTYPES:
            assert {
                r.compiled.kernel for r in rows if (r.compiled.target, r.dtype) == (target, dtype)
            }
    for row in rows:
        c = row.compiled
        assert 0 < c.registers <= 255, c
        assert c.spill_bytes == 0, f"{c} spills at {row.uses}"
        assert c.shared_bytes <= 100 * 1024, c  # under sm_80's 163 KiB and sm_90's 227 KiB


def test_launch_configuration_is_the_wrappers(rows: list[aot.Row]) -> None:
    """Block sizes and warps are those the launch wrappers choose (``triton_norm._blocks``)."""

    def row(kernel: str, target: str, dtype: str, use: str, signature: str) -> aot.Compiled:
        (found,) = [
            r.compiled
            for r in rows
            if (r.compiled.kernel, r.compiled.target, r.dtype, r.compiled.signature)
            == (kernel, target, dtype, signature)
            and use in r.uses
        ]
        return found

    # olmo2_7b's block norm: a 4096-wide row per program; per-head QK-norm: 16 rows of 128.
    # x bf16, residual, weight, output, rstd fp32
    mixed = "bf16,fp32,fp32,fp32,fp32"
    add_norm = row("_rms_norm_fwd_kernel", "sm_90", "bf16+fp32", "olmo2_7b full", mixed)
    assert (add_norm.block_m, add_norm.block_n, add_norm.num_warps) == triton_norm._blocks(
        4096, 4096
    )
    qk_head = row(
        "_qk_bwd_kernel", "sm_80", "bf16", "olmo2_7b head", ",".join(["bf16"] * 8 + ["fp32"] * 4)
    )
    assert (qk_head.block_m, qk_head.block_n, qk_head.num_warps) == (16, 128, 8)
    wide = row(
        "_qk_fwd_kernel", "sm_80", "fp32", "olmo2_32b full", ",".join(["fp32"] * 8)
    )  # q 5120 wide, k 1024
    assert (wide.block_m, wide.block_n, wide.num_warps) == (1, 8192, 16)


def _broken_kernel(X, BLOCK: tl.constexpr):
    """Sums a 1-D block over a second axis it does not have: the compiler rejects it."""
    x = tl.load(X + tl.arange(0, BLOCK))
    tl.store(X + tl.arange(0, BLOCK), tl.sum(x, axis=1))


def test_a_compile_error_fails() -> None:
    x = torch.empty(64, dtype=torch.float32, device="meta")
    # JITFunction, not @triton.jit: this process runs the interpreter (tests/conftest.py).
    broken = triton_norm.Launch("broken", JITFunction(_broken_kernel), (x,), {"BLOCK": 64})
    with pytest.raises(aot.AOTCompileError, match="_broken_kernel .* for sm_90"):
        aot.compile_launch(broken, "sm_90")


def test_amd_compiles_without_a_device() -> None:
    """The wheel's AMD backend builds an HSACO for MI300X with no ROCm installed."""
    rows = compile_kernels("--targets", "gfx942", "--models", "olmo2_tiny")
    assert {r.compiled.target for r in rows} == {"gfx942"} and len(rows) >= 4
    for row in rows:
        assert row.compiled.registers > 0 and row.compiled.spill_bytes == 0, row
