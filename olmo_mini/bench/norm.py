"""GPU benchmark of the norm kernels: Triton vs eager torch, torch.compile and ``F.rms_norm``.

Bandwidth is the op's minimal traffic over its time (the same bytes for every provider),
and is also shown as a percentage of ``torch.clone`` bandwidth measured on the same GPU,
the practical ceiling for a memory-bound pass. ``tools/bench_norm.py`` is the CLI:

    python tools/bench_norm.py --out-dir bench_out [--m 4096 16384] [--d 128 4096]
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from olmo_mini.bench.harness import markdown_table, parser, write_csv
from olmo_mini.kernels import add_rms_norm, qk_rms_norm, rms_norm
from olmo_mini.kernels.reference import add_rms_norm_torch, qk_rms_norm_torch, rms_norm_torch

KERNELS = {  # op: (the kernels' dispatcher, the eager torch reference)
    "rms_norm": (rms_norm, rms_norm_torch),
    "add_rms_norm": (add_rms_norm, add_rms_norm_torch),
    "qk_rms_norm": (qk_rms_norm, qk_rms_norm_torch),
}
OPS = tuple(KERNELS)
PROVIDERS = ("triton", "torch", "compile", "F.rms_norm")
PASSES = ("fwd", "bwd", "fwd+bwd")
M_VALUES = (4096, 16384, 65536)
D_VALUES = (128, 2048, 4096, 8192)
EPS = 1e-6
NO_GPU_MESSAGE = "bench_norm needs a CUDA GPU; none found, nothing measured."

# Minimal traffic in units of M*D elements. Forward: read the inputs, write the output.
# Backward: read x and dy, write dx (add_rms_norm's residual grad is dy itself, no traffic).
# rstd (4 bytes a row) and the weight and its dW partials are negligible at these sizes.
# qk_rms_norm splits the M rows between q and k, so its traffic matches rms_norm's.
TRAFFIC = {"rms_norm": (2, 3), "add_rms_norm": (3, 3), "qk_rms_norm": (2, 3)}  # (fwd, bwd)

NormFn = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
Timer = Callable[[Callable[[], object], list[torch.Tensor]], float]
"""``timer(fn, grad_to_none) -> ms``; ``triton.testing.do_bench`` on a GPU."""


@dataclasses.dataclass
class NormRow:
    """One op, pass, provider and shape; GB/s of the op's minimal traffic (see the table above)."""

    op: str
    pass_: str
    provider: str
    m: int
    d: int
    ms: float
    gbps: float
    pct_clone: float


def make_inputs(op: str, m: int, d: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Activations in ``dtype``, fp32 weights (as the model keeps them), all requiring grad."""

    def leaf(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, dtype=dt, device=device).requires_grad_()

    if op == "rms_norm":
        return [leaf(m, d), leaf(d, dt=torch.float32)]
    if op == "add_rms_norm":
        return [leaf(m, d), leaf(m, d), leaf(d, dt=torch.float32)]
    weights = [leaf(d, dt=torch.float32), leaf(d, dt=torch.float32)]
    return [leaf(m // 2, d), leaf(m - m // 2, d), *weights]


def provider_fn(op: str, provider: str) -> NormFn:
    """The function under test; F.rms_norm gets its weight in the activation dtype, as it needs."""
    kernel, torch_fn = KERNELS[op]
    reference = functools.partial(torch_fn, eps=EPS)
    if provider == "torch":
        return reference
    if provider == "compile":
        return torch.compile(reference)
    if provider == "triton":
        return lambda *args: kernel(*args, EPS, backend="triton")

    def f_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), EPS)

    if op == "rms_norm":
        return f_rms
    if op == "add_rms_norm":
        return lambda r, x, w: r + f_rms(x, w)
    return lambda q, k, wq, wk: (f_rms(q, wq), f_rms(k, wk))


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def time_passes(fn: NormFn, inputs: list[torch.Tensor], timer: Timer) -> dict[str, float]:
    """Forward, backward (graph kept, upstream grads fixed) and forward+backward, in ms."""
    outs = _as_tuple(fn(*inputs))  # also warms up (and compiles, for torch.compile)
    grads = [torch.randn_like(o) for o in outs]
    times = {"fwd": timer(lambda: fn(*inputs), [])}
    times["bwd"] = timer(lambda: torch.autograd.backward(outs, grads, retain_graph=True), inputs)
    times["fwd+bwd"] = timer(lambda: torch.autograd.backward(_as_tuple(fn(*inputs)), grads), inputs)
    return times


def sweep(
    ms: Sequence[int],
    ds: Sequence[int],
    ops: Sequence[str],
    providers: Sequence[str],
    device: str,
    timer: Timer,
    clone_gbps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> list[NormRow]:
    """Every (op, M, D, provider), printed as it goes."""
    results = []
    elem = torch.empty(0, dtype=dtype).element_size()
    for op, m, d in itertools.product(ops, ms, ds):
        fwd, bwd = TRAFFIC[op]
        units = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
        torch._dynamo.reset()  # a fresh compile per shape, not the recompile limit
        inputs = make_inputs(op, m, d, dtype, device)
        for provider in providers:
            times = time_passes(provider_fn(op, provider), inputs, timer)
            for pass_, t in times.items():
                gbps = units[pass_] * m * d * elem / (t * 1e-3) / 1e9
                r = NormRow(op, pass_, provider, m, d, t, gbps, 100 * gbps / clone_gbps)
                results.append(r)
                print(
                    f"{op:>13} {pass_:>7} {provider:>10} M={m:>6} D={d:>5} "
                    f"{t * 1e3:9.1f} us {gbps:8.1f} GB/s {r.pct_clone:5.1f}% of clone"
                )
        del inputs
    return results


def write_report(
    results: list[NormRow], clone_gbps: float, device_name: str, out_dir: Path
) -> None:
    """``norm_bench.csv``, ``norm_bench.md`` (table) and ``norm_bench.png`` (GB/s by shape)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(results, out_dir / "norm_bench.csv")
    header = ["op", "pass", "provider", "M", "D", "time (us)", "GB/s", "% of clone"]
    rows = [
        (*dataclasses.astuple(r)[:5], f"{r.ms * 1e3:.1f}", round(r.gbps), round(r.pct_clone))
        for r in results
    ]
    (out_dir / "norm_bench.md").write_text(
        f"# Norm kernel benchmark on {device_name}\n\nbf16 activations, fp32 weights; "
        f"torch.clone bandwidth {clone_gbps:.0f} GB/s.\n\n{markdown_table(header, rows)}\n"
    )

    from matplotlib.figure import Figure

    ops = list(dict.fromkeys(r.op for r in results))
    fig = Figure(figsize=(5 * len(PASSES), 3.5 * len(ops)))
    axes = fig.subplots(len(ops), len(PASSES), squeeze=False)
    shapes = list(dict.fromkeys((r.m, r.d) for r in results))
    labels = [f"{m}x{d}" for m, d in shapes]
    by_case = {(r.op, r.pass_, r.provider, r.m, r.d): r.gbps for r in results}
    for row, op in enumerate(ops):
        for col, pass_ in enumerate(PASSES):
            ax = axes[row][col]
            for provider in dict.fromkeys(r.provider for r in results):
                gbps = [by_case.get((op, pass_, provider, *shape), math.nan) for shape in shapes]
                ax.plot(range(len(shapes)), gbps, marker="o", label=provider)
            ax.axhline(clone_gbps, color="gray", linestyle="--", label="torch.clone")
            ax.set_xticks(range(len(shapes)), labels, rotation=60, fontsize=7)
            ax.set_title(f"{op} {pass_}")
            ax.set_ylabel("GB/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Norm kernels, bf16, {device_name}")
    fig.tight_layout()
    fig.savefig(out_dir / "norm_bench.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep on the current CUDA device and write the report; 0 without a GPU too."""
    cli = parser(__doc__)
    cli.add_argument("--out-dir", type=Path, default=Path("bench_norm_out"))
    cli.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="rows")
    cli.add_argument("--d", type=int, nargs="+", default=list(D_VALUES), help="columns")
    cli.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    cli.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    args = cli.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 0
    from triton.testing import do_bench

    def timer(fn: Callable[[], object], grad_to_none: list[torch.Tensor]) -> float:
        return do_bench(fn, grad_to_none=grad_to_none or None, return_mode="median")

    big = torch.empty(1 << 28, dtype=torch.bfloat16, device="cuda")  # 512 MiB
    clone_gbps = 2 * big.numel() * big.element_size() / (timer(big.clone, []) * 1e-3) / 1e9
    del big
    device_name = torch.cuda.get_device_name()
    print(f"{device_name}: torch.clone {clone_gbps:.0f} GB/s")
    results = sweep(args.m, args.d, args.ops, args.providers, "cuda", timer, clone_gbps)
    write_report(results, clone_gbps, device_name, args.out_dir)
    print(f"wrote {args.out_dir}/norm_bench.{{csv,md,png}}")
    return 0
