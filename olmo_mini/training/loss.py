"""Language-model loss: cross-entropy plus OLMo 2's z-loss, in fp32.

Kept apart from the LightningModule so that a fused or chunked LM-head + CE (which never
materializes the full logits) can replace ``lm_loss`` without touching the training loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100


class LossOutput(NamedTuple):
    loss: torch.Tensor  # ce + z; what backward runs on
    ce: torch.Tensor
    z: torch.Tensor  # already multiplied by the coefficient


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float) -> LossOutput:
    """Mean over non-ignored tokens of ``CE`` and ``z_loss * logsumexp(logits)**2``.

    One logsumexp serves both terms: ``CE = logsumexp(logits) - logits[label]``.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    mask = labels != IGNORE_INDEX
    target = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    count = mask.sum().clamp_min(1)
    ce = torch.where(mask, lse - target, 0.0).sum() / count
    z = z_loss * torch.where(mask, lse.square(), 0.0).sum() / count
    return LossOutput(ce + z, ce, z)
