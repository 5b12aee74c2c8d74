"""Fused Triton RMSNorm kernels: plain, residual-add and QK (two tensors, one launch).

Numerics are HF ``Olmo2RMSNorm``'s: fp32 statistics and fp32 weight multiply, one cast back
to the input dtype (then, for the residual add, the add in fp32 and one cast to the result
dtype, which is what ``residual + y`` does in torch).

Layout: every kernel sees a tensor as ``[rows, D]`` with unit column stride and a row
stride. Leading dims are taken in memory order (see ``_row_order``), so transposed views
such as the model's ``[B, H, T, D]`` QK-norm input need no copy; outputs get the input's
layout.

Performance shape (GPU): the forward runs one row per program for wide rows and a
``BLOCK_M``-row tile for rows of 256 or fewer columns (QK-norm), with ``num_warps`` by tile
size. The backward is persistent: a few programs per SM walk the row tiles, each keeping a
private fp32 dW partial in registers, written to a ``[programs, D]`` buffer and summed on
the host: deterministic and atomic-free. Only the fp32 ``rstd`` per row is saved.

Interpreter (``TRITON_INTERPRET=1``) rules kept here: no libdevice (``tl.math.rsqrt``), bf16
only ever loaded, stored or cast (all arithmetic after an fp32 cast), ``eps`` a plain float.

The host side is ``torch.library.custom_op``s with fake implementations, so the ops are
opaque single nodes to ``torch.compile`` (no graph break, and Inductor never re-launches
the kernels with fp64 scalars); ``autograd.Function``s in ``olmo_mini.kernels`` wire them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton reads the variable once at import; so does this module, at the same moment."""

LAUNCHES: collections.Counter[str] = collections.Counter()
"""Kernel launches by kernel name: lets tests prove the Triton path really ran."""

MAX_BLOCK_N = 65536  # a whole row lives in registers; wider rows would spill
NARROW_COLS = 256  # rows this narrow get several rows per program
TILE_ELEMS = 2048  # target elements per program for narrow-row tiles
INTERPRET_BWD_PROGRAMS = 4  # under the interpreter: few programs, still several tiles each
_EMULATE_RNE: tl.constexpr = tl.constexpr(INTERPRET)


# The kernels and their launches keep their arguments grouped by role on a few lines (pointers,
# strides, sizes, compile-time constants), as Triton's tutorials write them; `ruff format`, which
# would put each on its own line, leaves these regions alone.
# fmt: off
@triton.jit
def _cast(y, dtype: tl.constexpr):
    """``y.to(dtype)`` with round-to-nearest-even, as compiled Triton casts fp32 to bf16.

    The interpreter truncates fp32 -> bf16 instead, which would make CPU tests measure an
    error the GPU never makes; there the rounding is done on the bits first (finite values).
    """
    if _EMULATE_RNE:
        if dtype == tl.bfloat16:
            if y.dtype == tl.float32:
                bits = y.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _fwd_tile(
    X, R, W, Y, RSTD, stride_x, stride_r, stride_y, n_rows, n_cols, eps, tile,
    HAS_W: tl.constexpr, HAS_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Normalize rows ``tile*BLOCK_M ...`` of X into Y (plus R when HAS_R); store fp32 rstd."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    y = _cast(y, X.dtype.element_ty)
    if HAS_R:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        y = y.to(tl.float32) + r.to(tl.float32)
    tl.store(Y + rows64 * stride_y + cols[None, :], _cast(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_rows(
    X, W, DY, DX, RSTD, DW, stride_x, stride_dy, stride_dx, n_rows, n_cols, pid, num_progs,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program ``pid`` of ``num_progs``: dX for every ``num_progs``-th row tile, dW partial row.

    ``dy`` is cast to X's dtype first: the reference casts the normed output to X's dtype, so
    its gradient reaches the fp32 math through that cast (a no-op unless a residual of a
    wider dtype promoted the output).
    """
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), num_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
        dy = _cast(dy, X.dtype.element_ty).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        if HAS_W:
            dw += tl.sum(dy * xhat, axis=0)
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c = tl.sum(xhat * wdy, axis=1) / n_cols
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64 * stride_dx + cols[None, :], _cast(dx, DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, RSTD, stride_x, stride_r, stride_y, n_rows, n_cols, eps,
    HAS_W: tl.constexpr, HAS_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _fwd_tile(X, R, W, Y, RSTD, stride_x, stride_r, stride_y, n_rows, n_cols, eps,
              tl.program_id(0), HAS_W, HAS_R, BLOCK_M, BLOCK_N)


@triton.jit
def _rms_norm_bwd_kernel(
    X, W, DY, DX, RSTD, DW, stride_x, stride_dy, stride_dx, n_rows, n_cols,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _bwd_rows(X, W, DY, DX, RSTD, DW, stride_x, stride_dy, stride_dx, n_rows, n_cols,
              tl.program_id(0), tl.num_programs(0), HAS_W, BLOCK_M, BLOCK_N)


@triton.jit
def _qk_fwd_kernel(
    Q, K, WQ, WK, YQ, YK, RSTD_Q, RSTD_K, stride_q, stride_k, stride_yq, stride_yk,
    rows_q, rows_k, cols_q, cols_k, tiles_q, eps,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Programs ``[0, tiles_q)`` normalize q's row tiles, the rest k's: one launch for both."""
    pid = tl.program_id(0)
    if pid < tiles_q:
        _fwd_tile(Q, Q, WQ, YQ, RSTD_Q, stride_q, stride_q, stride_yq, rows_q, cols_q, eps,
                  pid, HAS_W, False, BLOCK_M, BLOCK_N)
    else:
        _fwd_tile(K, K, WK, YK, RSTD_K, stride_k, stride_k, stride_yk, rows_k, cols_k, eps,
                  pid - tiles_q, HAS_W, False, BLOCK_M, BLOCK_N)


@triton.jit
def _qk_bwd_kernel(
    Q, K, WQ, WK, DYQ, DYK, DQ, DK, RSTD_Q, RSTD_K, DWQ, DWK,
    stride_q, stride_k, stride_dyq, stride_dyk, stride_dq, stride_dk,
    rows_q, rows_k, cols_q, cols_k, progs_q,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Programs ``[0, progs_q)`` are q's persistent backward, the rest k's."""
    pid = tl.program_id(0)
    if pid < progs_q:
        _bwd_rows(Q, WQ, DYQ, DQ, RSTD_Q, DWQ, stride_q, stride_dyq, stride_dq, rows_q, cols_q,
                  pid, progs_q, HAS_W, BLOCK_M, BLOCK_N)
    else:
        _bwd_rows(K, WK, DYK, DK, RSTD_K, DWK, stride_k, stride_dyk, stride_dk, rows_k, cols_k,
                  pid - progs_q, tl.num_programs(0) - progs_q, HAS_W, BLOCK_M, BLOCK_N)
# fmt: on


def _blocks(n_cols: int, n_rows: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)``: whole rows per program, several when rows are narrow."""
    block_n = triton.next_power_of_2(n_cols)
    if block_n > MAX_BLOCK_N:
        raise ValueError(
            f"Triton RMSNorm supports rows of at most {MAX_BLOCK_N} columns, got {n_cols}"
        )
    block_m = 1
    if block_n <= NARROW_COLS:
        block_m = min(TILE_ELEMS // block_n, triton.next_power_of_2(max(n_rows, 1)))
    elems = block_m * block_n
    num_warps = 32 if elems >= 32768 else 16 if elems >= 8192 else 8 if elems >= 2048 else 4
    return block_m, block_n, num_warps


def _bwd_programs(device: torch.device, num_tiles: int, num_warps: int) -> int:
    """Persistent backward grid: about 32 resident warps per SM, never more programs than tiles."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = sms * max(1, 32 // num_warps)
    else:
        target = INTERPRET_BWD_PROGRAMS
    return max(1, min(num_tiles, target))


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the host side makes it: the kernel and its exact arguments."""

    name: str
    kernel: triton.runtime.JITFunction
    args: tuple
    meta: dict


_recording: list[Launch] | None = None
"""Where launches go instead of the device while ``recorded_launches`` is active."""


def _launch(name: str, kernel: triton.runtime.JITFunction, grid: tuple, *args, **meta) -> None:
    """Run ``kernel`` on ``grid``, or record the launch (``recorded_launches``)."""
    if _recording is not None:
        _recording.append(Launch(name, kernel, args, meta))
        return
    LAUNCHES[name] += 1
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Record the launches the host functions make instead of running them.

    With ``meta`` tensors of a real model's shapes this gives every kernel's arguments,
    block sizes and ``num_warps`` exactly as a GPU run would, with no GPU and no memory:
    what ``olmo_mini.kernels.aot`` compiles ahead of time.
    """
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def _row_order(x: torch.Tensor) -> list[int]:
    """Leading dims by decreasing stride: the order in which x's rows lie in memory.

    Viewing x through this permutation makes a transposed input (e.g. ``[B, H, T, D]`` from
    ``[B, T, H, D]``) a plain ``[rows, D]`` matrix without a copy.
    """
    return sorted(range(x.dim() - 1), key=lambda d: -x.stride(d))


def _as_rows(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``t`` as ``[rows, D]`` with unit column stride, rows in ``order``; a view when possible."""
    rows = t.permute(*order, t.dim() - 1).reshape(-1, t.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _empty_rows(
    x: torch.Tensor, order: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A new tensor shaped like ``x``, rows laid out in ``order``, and its ``[rows, D]`` view."""
    flat = torch.empty([x.shape[d] for d in order] + [x.shape[-1]], dtype=dtype, device=x.device)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return flat.permute(*inverse, x.dim() - 1), flat.view(-1, x.shape[-1])


def _num_rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _check_weight(x: torch.Tensor, weight: torch.Tensor | None) -> None:
    if weight is not None and weight.shape != (x.shape[-1],):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not match rows of {x.shape[-1]}"
        )


def _weight_arg(weight: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The weight made contiguous, or ``x`` as an unused pointer when there is no weight."""
    return x if weight is None else weight.contiguous()


def _dw_partial(weight: torch.Tensor | None, programs: int) -> torch.Tensor | None:
    """The ``[programs, D]`` fp32 buffer of per-program dW partials (None without weight).

    Every program writes its whole row, so it starts uninitialized; with 0 programs it sums
    to zeros, which is the gradient when there are no rows.
    """
    if weight is None:
        return None
    return weight.new_empty(programs, weight.shape[0], dtype=torch.float32)


def _dw_out(
    partial: torch.Tensor | None, weight: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """dW summed over program partials in fp32 (fixed order), or an empty tensor without weight."""
    if weight is None or partial is None:
        return like.new_empty(0)
    return partial.sum(0).to(weight.dtype)


def _rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual +) rms_norm(x, weight)`` and fp32 rstd per row (rows in x's memory order)."""
    _check_weight(x, weight)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
    order = _row_order(x)
    out_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    out, out2 = _empty_rows(x, order, out_dtype)
    n_rows, n_cols = _num_rows(x), x.shape[-1]
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out, rstd
    x2 = _as_rows(x, order)
    r2 = x2 if residual is None else _as_rows(residual, order)
    block_m, block_n, num_warps = _blocks(n_cols, n_rows)
    # fmt: off
    _launch("rms_norm_fwd", _rms_norm_fwd_kernel, (triton.cdiv(n_rows, block_m),),
        x2, r2, _weight_arg(weight, x2), out2, rstd, x2.stride(0), r2.stride(0), out2.stride(0),
        n_rows, n_cols, float(eps), HAS_W=weight is not None, HAS_R=residual is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    # fmt: on
    return out, rstd


rms_norm_fwd = torch.library.custom_op("olmo_mini::rms_norm_fwd", _rms_norm_fwd, mutates_args=())


@rms_norm_fwd.register_fake
def _rms_norm_fwd_fake(x, weight, residual, eps):
    out_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    out, _ = _empty_rows(x, _row_order(x), out_dtype)
    return out, x.new_empty(_num_rows(x), dtype=torch.float32)


def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)`` of the norm for upstream ``dy``; dw is empty when there is no weight."""
    order = _row_order(x)
    dx, dx2 = _empty_rows(x, order, x.dtype)
    n_rows, n_cols = _num_rows(x), x.shape[-1]
    if n_rows == 0:
        return dx, _dw_out(_dw_partial(weight, 0), weight, x)
    x2, dy2 = _as_rows(x, order), _as_rows(dy, order)
    block_m, block_n, num_warps = _blocks(n_cols, n_rows)
    programs = _bwd_programs(x.device, triton.cdiv(n_rows, block_m), num_warps)
    partial = _dw_partial(weight, programs)
    # fmt: off
    _launch("rms_norm_bwd", _rms_norm_bwd_kernel, (programs,),
        x2, _weight_arg(weight, x2), dy2, dx2, rstd, x2 if partial is None else partial,
        x2.stride(0), dy2.stride(0), dx2.stride(0), n_rows, n_cols,
        HAS_W=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    # fmt: on
    return dx, _dw_out(partial, weight, x)


rms_norm_bwd = torch.library.custom_op("olmo_mini::rms_norm_bwd", _rms_norm_bwd, mutates_args=())


@rms_norm_bwd.register_fake
def _rms_norm_bwd_fake(dy, x, weight, rstd):
    dx, _ = _empty_rows(x, _row_order(x), x.dtype)
    return dx, x.new_empty(0) if weight is None else torch.empty_like(weight)


def _qk_rms_norm_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_out, k_out, rstd_q, rstd_k)``: both norms in one launch."""
    if (q_weight is None) != (k_weight is None):
        raise ValueError("qk_rms_norm: give both q_weight and k_weight, or neither")
    if q.device != k.device:
        raise ValueError(f"qk_rms_norm: q on {q.device} but k on {k.device}")
    _check_weight(q, q_weight)
    _check_weight(k, k_weight)
    q_order, k_order = _row_order(q), _row_order(k)
    q_out, yq2 = _empty_rows(q, q_order, q.dtype)
    k_out, yk2 = _empty_rows(k, k_order, k.dtype)
    rows_q, rows_k = _num_rows(q), _num_rows(k)
    rstd_q = torch.empty(rows_q, dtype=torch.float32, device=q.device)
    rstd_k = torch.empty(rows_k, dtype=torch.float32, device=k.device)
    if rows_q == 0 and rows_k == 0:
        return q_out, k_out, rstd_q, rstd_k
    q2, k2 = _as_rows(q, q_order), _as_rows(k, k_order)
    block_m, block_n, num_warps = _blocks(max(q.shape[-1], k.shape[-1]), max(rows_q, rows_k))
    tiles_q = triton.cdiv(rows_q, block_m)
    # fmt: off
    _launch("qk_rms_norm_fwd", _qk_fwd_kernel, (tiles_q + triton.cdiv(rows_k, block_m),),
        q2, k2, _weight_arg(q_weight, q2), _weight_arg(k_weight, k2), yq2, yk2, rstd_q, rstd_k,
        q2.stride(0), k2.stride(0), yq2.stride(0), yk2.stride(0),
        rows_q, rows_k, q.shape[-1], k.shape[-1], tiles_q, float(eps),
        HAS_W=q_weight is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    # fmt: on
    return q_out, k_out, rstd_q, rstd_k


qk_rms_norm_fwd = torch.library.custom_op(
    "olmo_mini::qk_rms_norm_fwd", _qk_rms_norm_fwd, mutates_args=()
)


@qk_rms_norm_fwd.register_fake
def _(q, k, q_weight, k_weight, eps):
    q_out, rstd_q = _rms_norm_fwd_fake(q, q_weight, None, eps)
    k_out, rstd_k = _rms_norm_fwd_fake(k, k_weight, None, eps)
    return q_out, k_out, rstd_q, rstd_k


def _qk_rms_norm_bwd(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    rstd_q: torch.Tensor,
    rstd_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dq_weight, dk_weight)`` in one persistent launch; dW empty without weights."""
    q_order, k_order = _row_order(q), _row_order(k)
    dq, dq2 = _empty_rows(q, q_order, q.dtype)
    dk, dk2 = _empty_rows(k, k_order, k.dtype)
    rows_q, rows_k = _num_rows(q), _num_rows(k)
    if rows_q + rows_k == 0:
        dwq, dwk = (_dw_out(_dw_partial(w, 0), w, t) for w, t in ((q_weight, q), (k_weight, k)))
        return dq, dk, dwq, dwk
    q2, k2 = _as_rows(q, q_order), _as_rows(k, k_order)
    dyq2, dyk2 = _as_rows(dq_out, q_order), _as_rows(dk_out, k_order)
    block_m, block_n, num_warps = _blocks(max(q.shape[-1], k.shape[-1]), max(rows_q, rows_k))
    tiles_q, tiles_k = triton.cdiv(rows_q, block_m), triton.cdiv(rows_k, block_m)
    programs = _bwd_programs(q.device, tiles_q + tiles_k, num_warps)
    # Split the persistent grid by work: one program at least for a tensor with rows, never
    # more programs than tiles. (A side with no rows gets none; its [0, D] partial sums to 0.)
    progs_q = min(tiles_q, max(1, round(programs * tiles_q / (tiles_q + tiles_k))))
    progs_k = min(tiles_k, max(1, programs - progs_q))
    partial_q, partial_k = _dw_partial(q_weight, progs_q), _dw_partial(k_weight, progs_k)
    # fmt: off
    _launch("qk_rms_norm_bwd", _qk_bwd_kernel, (progs_q + progs_k,),
        q2, k2, _weight_arg(q_weight, q2), _weight_arg(k_weight, k2), dyq2, dyk2, dq2, dk2,
        rstd_q, rstd_k,
        q2 if partial_q is None else partial_q, k2 if partial_k is None else partial_k,
        q2.stride(0), k2.stride(0), dyq2.stride(0), dyk2.stride(0), dq2.stride(0), dk2.stride(0),
        rows_q, rows_k, q.shape[-1], k.shape[-1], progs_q,
        HAS_W=q_weight is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    # fmt: on
    return dq, dk, _dw_out(partial_q, q_weight, q), _dw_out(partial_k, k_weight, k)


qk_rms_norm_bwd = torch.library.custom_op(
    "olmo_mini::qk_rms_norm_bwd", _qk_rms_norm_bwd, mutates_args=()
)


@qk_rms_norm_bwd.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, rstd_q, rstd_k):
    dq, dwq = _rms_norm_bwd_fake(dq_out, q, q_weight, rstd_q)
    dk, dwk = _rms_norm_bwd_fake(dk_out, k, k_weight, rstd_k)
    return dq, dk, dwq, dwk
