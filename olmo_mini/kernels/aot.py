"""The Triton norm kernels compiled ahead of time for real GPU targets, on a machine without one.

Triton compiles for a named target (``GPUTarget``) with no device present: its own LLVM and the
``ptxas`` its wheel ships give PTX and a cubin for NVIDIA, and AMDGCN and an HSACO for AMD. So a
kernel the compiler rejects, or one that spills at a real shape, fails here instead of on the
first GPU. The launches are not described a second time: the host functions of
``triton_norm`` run on ``meta`` tensors of a model's real shapes under ``recorded_launches``,
which yields each kernel's exact arguments, block sizes and ``num_warps``; Triton's own binder
then turns them into the signature, specializations and options a GPU launch would compile
(its internal ``create_function_from_signature`` and ``_pack_args``, as of Triton 3.9).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from olmo_mini.kernels import triton_norm
from olmo_mini.kernels.triton_norm import Launch

TARGETS = {
    "sm_80": GPUTarget("cuda", 80, 32),  # A100
    "sm_90": GPUTarget("cuda", 90, 32),  # H100
    "gfx942": GPUTarget("hip", "gfx942", 64),  # MI300X
}
NVIDIA_TARGETS = ("sm_80", "sm_90")

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
SHORT = {f32: "fp32", bf16: "bf16", f16: "fp16"}
DTYPES: dict[str, tuple[torch.dtype, torch.dtype, torch.dtype]] = {
    # (matmul outputs, parameters, residual stream) as the norms see them
    "fp32": (f32, f32, f32),  # precision 32-true
    "bf16+fp32": (bf16, f32, f32),  # bf16-mixed on one device: autocast, fp32 weights and stream
    "bf16": (bf16, bf16, bf16),  # bf16-true, and bf16-mixed under FSDP (bf16 parameters)
    "fp16": (f16, f16, f16),  # a model cast with .half() for inference: forwards only
}
TRAINING_DTYPES = ("fp32", "bf16+fp32", "bf16")  # no trainer precision runs fp16
QK_NORMS = ("full", "head", "qkv")  # the modes that launch kernels ("none" and "l2" do not)


class AOTCompileError(RuntimeError):
    """A kernel that the Triton compiler (or ptxas) rejected for a target."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the norms of a decoder see: widths and heads, as plain numbers (kernels know no model)."""

    name: str
    d_model: int
    n_heads: int
    n_kv_heads: int
    seq_len: int


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, backward: bool):
    """The launches of one (residual-add) RMSNorm forward, and its backward when ``backward``."""
    out, rstd = triton_norm._rms_norm_fwd(x, weight, residual, 1e-6)
    if backward:
        triton_norm._rms_norm_bwd(torch.empty_like(out), x, weight, rstd)


def model_launches(shape: ModelShape, dtype: str, qk_norm: str, decode: bool) -> list[Launch]:
    """Every norm launch of one training step (``decode=False``: one sequence of ``seq_len``
    tokens, forward and backward) or one generated token (forward only) of a decoder.

    Block norms are the reordered block's residual adds and the final norm (the ``pre`` block's
    norms are the plain forward on the stream); QK-norm as ``qk_norm`` lays q and k out: ``full``
    and ``qkv`` as ``[B, T, H*D]`` rows (``qkv`` also normalizes v), ``head`` as the transposed
    ``[B, H, T, D]`` view. The micro-batch size changes no compile, so one sequence stands for all;
    the fp16 class (inference only) has no backward.
    """
    act, param, stream = DTYPES[dtype]
    tokens = 1 if decode else shape.seq_len
    backward = not decode and dtype in TRAINING_DTYPES
    head_dim = shape.d_model // shape.n_heads
    q_size, kv_size = shape.n_heads * head_dim, shape.n_kv_heads * head_dim
    with triton_norm.recorded_launches() as launches:
        w = _meta(shape.d_model, dtype=param)
        x, h = (
            _meta(1, tokens, shape.d_model, dtype=act),
            _meta(1, tokens, shape.d_model, dtype=stream),
        )
        _norm(x, w, h, backward)  # reordered block: h = x + norm(attn(x))
        _norm(h, w, None, backward)  # final norm; the pre-norm block's norms
        if qk_norm == "head":
            q = _meta(1, tokens, shape.n_heads, head_dim, dtype=act).transpose(1, 2)
            k = _meta(1, tokens, shape.n_kv_heads, head_dim, dtype=act).transpose(1, 2)
            wq = wk = _meta(head_dim, dtype=param)
        else:
            q, k = _meta(1, tokens, q_size, dtype=act), _meta(1, tokens, kv_size, dtype=act)
            wq, wk = _meta(q_size, dtype=param), _meta(kv_size, dtype=param)
        q_out, k_out, rstd_q, rstd_k = triton_norm._qk_rms_norm_fwd(q, k, wq, wk, 1e-6)
        if backward:
            dq, dk = torch.empty_like(q_out), torch.empty_like(k_out)
            triton_norm._qk_rms_norm_bwd(dq, dk, q, k, wq, wk, rstd_q, rstd_k)
        if qk_norm == "qkv":
            _norm(_meta(1, tokens, kv_size, dtype=act), wk, None, backward)
    return launches


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One kernel compiled for one target, with the resources the toolchain reports."""

    kernel: str
    target: str
    signature: str  # tensor dtypes in argument order, e.g. "bf16,fp32,fp32,fp32,fp32"
    block_m: int
    block_n: int
    num_warps: int
    registers: int  # per thread (NVIDIA) or VGPRs per lane (AMD)
    spill_bytes: int  # local memory per thread, where ptxas spills (AMD: spilled registers)
    shared_bytes: int  # shared memory (LDS on AMD) the launch requests


_CACHE: dict[tuple, Compiled] = {}
"""Compiled kernels by class: target, kernel, pointer dtypes and constants (flags, block sizes,
``num_warps``). Integer arguments only add alignment specializations, so the first launch of a
class (a training step's, where there is one) stands for it and each class compiles once."""


def compile_launch(launch: Launch, target: str) -> Compiled:
    """Compile ``launch``'s kernel for ``target`` as Triton would at that launch on that GPU.

    Raises ``AOTCompileError`` naming the kernel and target when Triton or ptxas rejects it.
    """
    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise AOTCompileError(
            f"{launch.name}: the kernels were made for Triton's interpreter (TRITON_INTERPRET=1 "
            "when triton was imported); compile ahead of time in a process without it"
        )
    name = kernel.fn.__name__
    pointers = ",".join(SHORT[a.dtype] for a in launch.args if torch.is_tensor(a))
    key = (target, name, pointers, tuple(sorted(launch.meta.items())))
    if key in _CACHE:
        return _CACHE[key]
    gpu = TARGETS[target]
    backend = make_backend(gpu)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constants, attrs = kernel._pack_args(
        backend, launch.meta, bound, specialization, options
    )
    try:
        source = ASTSource(kernel, signature, constants, attrs)
        compiled = triton.compile(source, target=gpu, options=options.__dict__)
    except Exception as error:  # Triton's CompilationError, PTXASError, MLIR failures
        raise AOTCompileError(
            f"{name} ({launch.name}) failed to compile for {target}: {error}"
        ) from error
    registers, spills = _resources(compiled.asm, gpu.backend)
    meta = compiled.metadata
    block_m, block_n = launch.meta["BLOCK_M"], launch.meta["BLOCK_N"]
    _CACHE[key] = Compiled(
        name, target, pointers, block_m, block_n, meta.num_warps, registers, spills, meta.shared
    )
    return _CACHE[key]


def _resources(asm: dict, backend: str) -> tuple[int, int]:
    """``(registers, spill bytes)`` of a compiled kernel: from the cubin (``cuobjdump``, shipped
    with Triton) or the AMDGCN metadata."""
    if backend == "hip":
        counts = dict(re.findall(r"\.(\w+_count):\s+(\d+)", asm["amdgcn"]))
        spills = int(counts["vgpr_spill_count"]) + int(counts["sgpr_spill_count"])
        return int(counts["vgpr_count"]), spills
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(asm["cubin"])
        usage = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", str(cubin)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    found = dict(re.findall(r"\b(REG|LOCAL):(\d+)", usage))
    return int(found["REG"]), int(found["LOCAL"])


@dataclasses.dataclass
class Row:
    """One line of the kernel table: a compiled kernel and the model uses that launch it."""

    compiled: Compiled
    dtype: str
    uses: list[str]


def compile_models(shapes: Iterable[ModelShape], targets: Iterable[str]) -> list[Row]:
    """Compile every norm launch of ``shapes`` (training steps and decoding, every QK-norm mode,
    every dtype class) for ``targets``; one row per compiled kernel and dtype class."""
    rows: dict[tuple[Compiled, str], Row] = {}
    for shape, dtype, qk_norm, decode in itertools.product(shapes, DTYPES, QK_NORMS, (False, True)):
        use = f"{shape.name} {qk_norm}{' decode' if decode else ''}"
        launches = model_launches(shape, dtype, qk_norm, decode)
        for launch, target in itertools.product(launches, targets):
            compiled = compile_launch(launch, target)
            row = rows.setdefault((compiled, dtype), Row(compiled, dtype, []))
            if use not in row.uses:
                row.uses.append(use)
    return list(rows.values())


def markdown_table(rows: list[Row]) -> str:
    """The kernel table of docs/kernels.md."""
    lines = [
        "| kernel | target | dtype | pointers | BLOCK_M×BLOCK_N | warps | registers | spill B "
        "| shared B | launched by |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in sorted(rows, key=lambda r: (r.compiled.kernel, r.compiled.target, r.dtype)):
        c = row.compiled
        lines.append(
            f"| `{c.kernel}` | {c.target} | {row.dtype} | {c.signature} | {c.block_m}×{c.block_n} "
            f"| {c.num_warps} | {c.registers} | {c.spill_bytes} | {c.shared_bytes} "
            f"| {_summarize(row.uses)} |"
        )
    return "\n".join(lines)


def _summarize(uses: list[str]) -> str:
    """``uses`` grouped by model: ``olmo2_7b full, head; olmo2_13b ...``."""
    by_model: dict[str, list[str]] = {}
    for use in uses:
        model, mode = use.split(" ", 1)
        by_model.setdefault(model, []).append(mode)
    return "; ".join(f"{m} {', '.join(modes)}" for m, modes in by_model.items())


def shipped_shapes(folder: Path) -> list[ModelShape]:
    """The shapes of ``configs/model/*.yaml`` by width, GQA after MHA (read as plain YAML).
    A LayerNorm model (``norm_type: layer``, the ``wortsman`` preset) launches no Triton norm
    kernel: it has no shape here."""
    import yaml

    shapes = []
    for path in folder.glob("*.yaml"):
        values = yaml.safe_load(path.read_text())
        if values.get("norm_type", "rms") != "rms":
            continue
        heads = values["n_heads"]
        kv_heads = values.get("n_kv_heads") or heads
        shape = ModelShape(path.stem, values["d_model"], heads, kv_heads, values["max_seq_len"])
        shapes.append(shape)
    return sorted(shapes, key=lambda s: (s.d_model, -s.n_kv_heads))


def main(argv: list[str] | None = None) -> int:
    """Compile every kernel launch of the shipped model configs and print the kernel table."""
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=Path, default=Path("configs/model"))
    parser.add_argument("--models", nargs="+", help="config names (default: every one)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--json", action="store_true", help="the rows as JSON, not markdown")
    args = parser.parse_args(argv)
    shapes = [s for s in shipped_shapes(args.configs) if not args.models or s.name in args.models]
    if not shapes:
        print(f"error: no model config {args.models} in {args.configs}")
        return 1
    start = time.perf_counter()
    try:
        rows = compile_models(shapes, args.targets)
    except AOTCompileError as error:
        print(f"error: {error}")
        return 1
    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows]))
        return 0
    print(markdown_table(rows))
    seconds = time.perf_counter() - start
    targets = ", ".join(args.targets)
    print(f"\n{len(rows)} rows, {len(_CACHE)} compiles for {targets} in {seconds:.0f} s")
    return 0
