"""Norm kernels: one entry point per operation, dispatching to Triton or plain torch.

``backend="torch"`` is the reference, ``"triton"`` the fused kernels (CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``) and ``"auto"`` picks Triton for CUDA tensors when it
imports, torch otherwise. Triton is imported guarded, so the package works without it.
"""

from __future__ import annotations

import torch

from olmo_mini.kernels.reference import add_rms_norm_torch, qk_rms_norm_torch, rms_norm_torch

try:
    from olmo_mini.kernels import triton_norm
except ImportError:  # no triton (e.g. macOS): the torch reference still works
    triton_norm = None

BACKENDS = ("auto", "torch", "triton")


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether ``backend`` runs the Triton kernels for ``x``; a clear error where it cannot."""
    if backend == "torch":
        return False
    if backend == "auto":
        return triton_norm is not None and x.is_cuda
    if backend != "triton":
        raise ValueError(f"norm backend must be one of {list(BACKENDS)}, got {backend!r}")
    if triton_norm is None:
        raise RuntimeError("norm backend 'triton' needs the triton package, which did not import")
    if not (x.is_cuda or (x.device.type == "cpu" and triton_norm.INTERPRET)):
        raise RuntimeError(
            f"norm backend 'triton' runs on CUDA tensors, or on CPU tensors when "
            f"TRITON_INTERPRET=1 is set before triton is imported; got a {x.device.type} tensor"
        )
    return True


class RMSNormFunction(torch.autograd.Function):
    """Triton ``rms_norm(x)``, or ``residual + rms_norm(x)`` in one pass (the residual's gradient
    is ``dout``); saves x, weight and the fp32 rstd per row."""

    @staticmethod
    def forward(
        ctx, residual: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        out, rstd = triton_norm.rms_norm_fwd(x, weight, residual, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.residual_dtype = None if residual is None else residual.dtype
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = triton_norm.rms_norm_bwd(dout, x, weight, rstd)
        dresidual = None if ctx.residual_dtype is None else dout.to(ctx.residual_dtype)
        return dresidual, dx, None if weight is None else dw, None


class QKRMSNormFunction(torch.autograd.Function):
    """Triton QK-norm: q and k normalized in one launch forward and one backward."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        q_weight: torch.Tensor | None,
        k_weight: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_out, k_out, rstd_q, rstd_k = triton_norm.qk_rms_norm_fwd(q, k, q_weight, k_weight, eps)
        ctx.save_for_backward(q, k, q_weight, k_weight, rstd_q, rstd_k)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        q, k, q_weight, k_weight, rstd_q, rstd_k = ctx.saved_tensors
        dq, dk, dwq, dwk = triton_norm.qk_rms_norm_bwd(
            dq_out, dk_out, q, k, q_weight, k_weight, rstd_q, rstd_k
        )
        no_w = q_weight is None
        return dq, dk, None if no_w else dwq, None if no_w else dwk, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, backend: str = "auto"
) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x^2) + eps)`` over the last dim, in fp32, cast back."""
    if _use_triton(backend, x):
        return RMSNormFunction.apply(None, x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    backend: str = "auto",
) -> torch.Tensor:
    """``residual + rms_norm(x, weight, eps)``: OLMo 2's reordered residual step."""
    if _use_triton(backend, x):
        return RMSNormFunction.apply(residual, x, weight, eps)
    return add_rms_norm_torch(residual, x, weight, eps)


def qk_rms_norm(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """QK-norm of q and k over their last dims, one launch on the Triton path.

    Both model layouts: ``full`` (q ``[B, T, H*D]``, k ``[B, T, Hkv*D]``, weights of those
    widths) and ``head`` (q ``[B, H, T, D]``, k ``[B, Hkv, T, D]``, weights ``[D]``; the
    transposed views need no copy). Outputs keep the inputs' layouts.
    """
    if _use_triton(backend, q):
        return QKRMSNormFunction.apply(q, k, q_weight, k_weight, eps)
    return qk_rms_norm_torch(q, k, q_weight, k_weight, eps)


__all__ = ["BACKENDS", "add_rms_norm", "qk_rms_norm", "rms_norm"]
