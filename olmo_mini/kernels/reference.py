"""Plain-torch RMSNorm reference with HF ``Olmo2RMSNorm`` numerics.

Statistics and the weight multiply run in fp32; only the result is cast back to the
input dtype. This is what ``backend="torch"`` runs and what ``torch.compile`` sees.
"""

from __future__ import annotations

import torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


def add_rms_norm_torch(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return residual + rms_norm_torch(x, weight, eps)


def qk_rms_norm_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """QK-norm: each of q and k normalized over its last dim with its own weight."""
    return rms_norm_torch(q, q_weight, eps), rms_norm_torch(k, k_weight, eps)
