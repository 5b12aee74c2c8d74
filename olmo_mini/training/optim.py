"""AdamW with OLMo 2's parameter groups and its warmup + cosine learning-rate schedule (or a
constant LR after warmup)."""

from __future__ import annotations

import math

import torch
from torch import nn

from olmo_mini.config import OptimConfig


def param_groups(
    model: nn.Module, weight_decay: float, embedding_weight_decay: bool = False
) -> list[dict]:
    """Two groups: the token embedding, without weight decay unless ``embedding_weight_decay``,
    and everything else with it.

    OLMo 2 decays norms (q/k norms included) and the untied LM head; only embeddings are exempt.
    """
    embedding, decayed = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (embedding if name.endswith("embed_tokens.weight") else decayed).append(param)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": embedding, "weight_decay": weight_decay if embedding_weight_decay else 0.0},
    ]


def group_weight_decay(config: OptimConfig) -> float:
    """The weight decay to hand AdamW so that it decays as ``optim.weight_decay_mode`` says.

    AdamW decays decoupled from the gradient, ``θ ← θ − lr_t·wd·θ``, with ``lr_t = s_t·lr``
    set by the schedule (multiplier ``s_t``). Independent decay (Wortsman et al. 2023) wants
    ``θ ← θ − s_t·λ·θ``, so the group gets ``wd = λ / lr``: peak LR and decay stay separate
    knobs, and an LR sweep does not also sweep the decay.
    """
    if config.weight_decay_mode == "independent":
        return config.weight_decay / config.lr
    return config.weight_decay


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW, the fused implementation (one kernel; plain and DTensor parameters alike): the
    training module skips non-finite steps through its ``found_inf``, without a host sync."""
    return torch.optim.AdamW(
        param_groups(model, group_weight_decay(config), config.embedding_weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=True,
    )


def lr_lambda(warmup_steps: int, max_steps: int, min_lr_ratio: float, schedule: str = "cosine"):
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup from
    1/warmup to 1, then cosine to ``min_lr_ratio`` at ``max_steps`` and flat after, or with
    ``schedule="constant"`` 1 to the end."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    multiplier = lr_lambda(config.warmup_steps, max_steps, config.final_lr_ratio, config.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
