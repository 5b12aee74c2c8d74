"""QK-Clip (Kimi K2, arXiv:2507.20534 §2.1): bound attention logits by rescaling weights.

Every training forward, a hook on each attention's ``logit_probe`` takes the exact per-head
max logit ``S_h`` (chunked, no grad). After the optimizer step, with ``S_h`` maxed over the
step's micro-batches and over ranks, every head with ``S_h > tau`` has its logits scaled by
``γ_h = tau / S_h``: on the inputs just seen, its max logit becomes exactly ``tau``. As in
K2, ``S_h`` is that of the step's forward (before the update), the step's forward and
backward are untouched, and Adam's moments are left as they are. Steps the module skips
(non-finite loss or gradient norm) are not clipped.

Where the factor goes depends on ``model.qk_norm`` (a norm after the projection would undo
any scaling of the projection rows):

- ``none``: rows of ``q_proj`` / ``k_proj``;
- ``full`` / ``qkv``: the head's segment of ``q_norm.weight`` / ``k_norm.weight``;
- ``head``: one norm weight is shared by all heads, so q and k weights both take
  ``sqrt(min_h γ_h)``: every head's logits shrink by the smallest factor;
- ``l2``: the logit is ``qk_scale · cos(q, k)``; ``qk_scale`` takes ``min_h γ_h``.

For per-head placements, K2's MHA rule (``sqrt(γ)`` on each of q and k) is extended to GQA:
the shared key head takes ``sqrt(γ_kv)`` with ``γ_kv`` the smallest ``γ`` of its query heads,
and each query head ``γ_h / sqrt(γ_kv)``, so every head's logits scale by exactly its own
``γ_h`` (heads under ``tau`` keep their logits; their q rows may grow as their k rows shrink).

Under FSDP2 the parameters are DTensors sharded on dim 0: each rank scales its own rows with
the matching slice of the per-row factor vector; nothing is gathered.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from olmo_mini.config import ConfigError
from olmo_mini.model.config import OLMo2Config, QKNorm
from olmo_mini.model.model import Attention, OLMo2
from olmo_mini.stability.metrics import max_attention_logit
from olmo_mini.stepping import StepCallback


def check_supported(config: OLMo2Config) -> None:
    """QK-Clip needs a weight to scale after the projections' normalization, if there is one."""
    if config.qk_norm in (QKNorm.full, QKNorm.qkv, QKNorm.head) and not config.norm_affine:
        raise ConfigError(
            f"optim.qk_clip_tau needs model.norm_affine=true with model.qk_norm="
            f"{config.qk_norm}: the q/k norms normalize away any scaling of the projections, "
            "and without norm weights there is nothing left to scale"
        )


@torch.no_grad()
def clip_attention(attn: Attention, gamma: torch.Tensor) -> None:
    """Scale the logits of each head h of ``attn`` by ``gamma[h]`` (≤ 1), in place (see above)."""
    if attn.qk_scale is not None:  # l2
        _scale(attn.qk_scale, gamma.min())
        return
    if attn.norm_per_head:
        factor = gamma.min().sqrt()
        _scale(attn.q_norm.weight, factor)
        _scale(attn.k_norm.weight, factor)
        return
    group = attn.n_heads // attn.n_kv_heads
    k_factor = gamma.view(attn.n_kv_heads, group).amin(dim=1).sqrt()  # [KV]
    q_factor = gamma / k_factor.repeat_interleave(group)  # [H]: q·k scales by gamma
    if attn.q_norm is not None:  # full, qkv
        q_param, k_param = attn.q_norm.weight, attn.k_norm.weight
    else:
        q_param, k_param = attn.q_proj.weight, attn.k_proj.weight
    _scale(q_param, q_factor.repeat_interleave(attn.head_dim))
    _scale(k_param, k_factor.repeat_interleave(attn.head_dim))


def clip_model(model: OLMo2, max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """QK-Clip every layer given per-head max logits ``[n_layers, H]``; returns the γ used."""
    gamma = torch.where(max_logits > tau, tau / max_logits, torch.ones_like(max_logits))
    for block, layer_gamma in zip(model.blocks, gamma, strict=True):
        clip_attention(block.attention, layer_gamma)
    return gamma


def _scale(param: nn.Parameter, factor: torch.Tensor) -> None:
    """``param *= factor``: one factor for all, or one per row (dim 0), on this rank's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    factor = factor.to(param.dtype)
    if isinstance(param, DTensor):
        if factor.ndim:  # the rows this rank holds: the same dim-0 split as the parameter's
            factor = distribute_tensor(
                factor, param.device_mesh, param.placements, src_data_rank=None
            ).to_local()
        param = param.to_local()  # shares storage with the DTensor
    param.mul_(factor.view(-1, *[1] * (param.ndim - 1)) if factor.ndim else factor)


class QKClip(StepCallback):
    """Applies QK-Clip after every optimizer step; records ``qk_clip/layer{i}/max_logit``
    (before the clip) and ``qk_clip/layer{i}/clipped_heads`` every ``trainer.log_every_n_steps``
    steps. Nothing here waits for the device."""

    def __init__(self, tau: float, model_config: OLMo2Config) -> None:
        super().__init__()
        check_supported(model_config)
        self.tau = tau
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._capturing = False
        # Per layer, this step's per-head max logit so far (on this rank).
        self._max: list[torch.Tensor | None] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model: OLMo2 = pl_module.model
        self._max = [None] * len(model.blocks)
        for i, block in enumerate(model.blocks):
            probe = block.attention.logit_probe
            self._hooks.append(probe.register_forward_hook(self._hook(i, block.attention)))

    def _hook(self, layer: int, attn: Attention):
        # Registered once, before any compiled forward; compiled blocks call it eagerly.
        @torch.compiler.disable
        def hook(_probe: nn.Module, args: tuple[torch.Tensor, torch.Tensor], _out: Any) -> None:
            if not self._capturing:  # validation, generation, activation-checkpoint recompute
                return
            seen = max_attention_logit(*args, attn.softmax_scale)
            old = self._max[layer]
            self._max[layer] = seen if old is None else torch.maximum(old, seen)

        return hook

    def on_train_batch_start(self, *args: Any) -> None:
        self._capturing = True

    def on_before_backward(self, *args: Any) -> None:
        self._capturing = False

    def post_optim_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        max_logits = torch.stack(self._max)  # [n_layers, H]
        self._max = [None] * len(self._max)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(max_logits, op=torch.distributed.ReduceOp.MAX)
        # A skipped update (fused AdamW's ``found_inf`` set) is not clipped: zero max logits
        # give every head a factor of 1.
        applied = trainer.optimizers[0].found_inf == 0
        clip_from = torch.where(applied, max_logits, 0.0)
        clip_model(pl_module.model, clip_from, self.tau)
        if step % trainer.log_every_n_steps:
            return
        clipped = (clip_from > self.tau).sum(dim=1)
        for i in range(len(max_logits)):
            pl_module.recorder.record(step, f"qk_clip/layer{i}/max_logit", max_logits[i].amax())
            pl_module.recorder.record(step, f"qk_clip/layer{i}/clipped_heads", clipped[i])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
