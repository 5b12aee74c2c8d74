"""``StabilityMonitor``: per-layer q/k, attention-logit, activation, gradient and update
statistics every ``stability.every_n_steps`` optimizer steps, plus spike scores every step.

On a measuring step, forward hooks on every attention's probes and every block collect
mergeable statistics (``Reduction``) over all micro-batches of the global batch; gradient
norms come just before clipping and update ratios just after the optimizer step. Sums and
maxima are reduced over ranks before they become RMS values, so an FSDP run logs the same
numbers as a single process on the same global batch, and no rank gathers the model.
Between measuring steps nothing is hooked and nothing is computed.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from olmo_mini.model.model import Attention, OLMo2
from olmo_mini.stability.config import StabilityConfig
from olmo_mini.stability.metrics import (
    Reduction,
    SpikeScore,
    attention_logit_statistics,
    device_scalar,
    finalize_rms,
    logit_statistics,
    rms_statistics,
)
from olmo_mini.stepping import StepCallback


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter or gradient."""
    return t.to_local() if hasattr(t, "to_local") else t


def _block_sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares over this rank's shards (a partial sum under FSDP, summed over ranks later)."""
    return torch.stack([_local(t).detach().float().square().sum() for t in tensors]).sum()


class StabilityMonitor(StepCallback):
    """Records ``qk/``, ``attn/``, ``act/``, ``grad/``, ``update/``, ``logits/`` and
    ``stability/`` metrics through the module's ``recorder``.

    Spike scores are computed in ``pre_log_metrics`` from every flushed step's ``train/loss``
    and ``train/grad_norm``: they see every step without a host sync per step. Output-logit
    statistics come from ``training_step``'s outputs (``max_logit``, ``lse_sum``).
    """

    def __init__(self, config: StabilityConfig) -> None:
        super().__init__()
        self.config = config
        spikes = (config.spike_window, config.spike_sigma, config.spike_min_history)
        self.loss_spikes, self.grad_spikes = SpikeScore(*spikes), SpikeScore(*spikes)
        self._stats: Reduction | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._before_step: list[list[torch.Tensor]] | None = None
        self._last_step = 0  # the last step scored for spikes

    def pre_log_metrics(self, rows: dict[int, dict[str, float]]) -> None:
        """Spike scores for each newly flushed training step, at that step."""
        for step, row in rows.items():
            if "train/loss" not in row or step <= self._last_step:
                continue
            self._last_step = step
            self.loss_spikes.update(row["train/loss"])
            self.grad_spikes.update(row["train/grad_norm"])
            row["stability/spike_score_loss"] = self.loss_spikes.score
            row["stability/spike_score_grad"] = self.grad_spikes.score

    def measuring(self, step: int) -> bool:
        return self.config.enabled and (step == 1 or step % self.config.every_n_steps == 0)

    # -- forward: hooks on the probes and blocks -------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.measuring(trainer.global_step + 1):
            return
        if self._stats is None:  # the global batch's first micro-batch
            self._stats = Reduction()
        # Compiled blocks would not run hooks registered after compilation: measure eagerly.
        torch.compiler.set_stance("force_eager")
        self._hooks = self._register(pl_module.model, self._stats)

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # Removed before backward: activation checkpointing re-runs forwards there.
        if self._hooks:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            torch.compiler.set_stance("default")

    @staticmethod
    def _register(model: OLMo2, stats: Reduction) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for i, block in enumerate(model.blocks):
            attn: Attention = block.attention

            def pre_norm(_m: nn.Module, args: tuple, _out: Any, i: int = i, attn: Attention = attn):
                q, k = args
                rms_statistics(stats, f"{i}/q_pre", q, attn.n_heads)
                rms_statistics(stats, f"{i}/k_pre", k, attn.n_kv_heads)

            def logits(_m: nn.Module, args: tuple, _out: Any, i: int = i, attn: Attention = attn):
                q, k = args
                rms_statistics(stats, f"{i}/q", q, attn.n_heads)
                rms_statistics(stats, f"{i}/k", k, attn.n_kv_heads)
                attention_logit_statistics(
                    stats, f"{i}/attn", q, k, attn.softmax_scale, attn.softcap
                )

            def output(_m: nn.Module, _args: tuple, out: torch.Tensor, i: int = i):
                stats.add(f"{i}/act_sumsq", out.detach().float().square().sum())
                stats.add(f"{i}/act_count", device_scalar(out.numel(), out.device))

            handles.append(attn.pre_norm_probe.register_forward_hook(pre_norm))
            handles.append(attn.logit_probe.register_forward_hook(logits))
            handles.append(block.register_forward_hook(output))
        return handles

    # -- gradients before clipping, weights before the update ------------------------------
    def pre_optim_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._stats is None:
            return
        model: OLMo2 = pl_module.model
        self._before_step = []
        for i, block in enumerate(model.blocks):
            params = [p for p in block.parameters() if p.requires_grad]
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                self._stats.add(f"{i}/grad_sumsq", _block_sumsq(grads))
            self._before_step.append([_local(p).detach().clone() for p in params])
            self._stats.add(f"{i}/weight_sumsq", _block_sumsq(params))
            attn = block.attention
            for name, norm in (("q", attn.q_norm), ("k", attn.k_norm)):
                if norm is not None and norm.weight is not None:
                    w = _local(norm.weight).detach().float()
                    self._stats.add(f"{i}/{name}_gain_sum", w.abs().sum())
                    self._stats.add(f"{i}/{name}_gain_count", device_scalar(w.numel(), w.device))

    # -- after each micro-batch: output logits; after the step: update ratios, reduce, record
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict[str, Any],
        batch: dict[str, torch.Tensor],
        batch_idx: int,
    ) -> None:
        if self._stats is not None:
            tokens = batch["labels"].numel()
            logit_statistics(self._stats, outputs["max_logit"], outputs["lse_sum"], tokens)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def post_optim_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if self._stats is None:
            return
        for name, value in self._finish_measurement(pl_module.model).items():
            pl_module.recorder.record(step, name, value)
        self._stats, self._before_step = None, None

    def _finish_measurement(self, model: OLMo2) -> dict[str, torch.Tensor]:
        """The step's metrics as device scalars, from statistics reduced over ranks."""
        stats = self._stats
        for i, (block, before) in enumerate(zip(model.blocks, self._before_step, strict=True)):
            params = [p for p in block.parameters() if p.requires_grad]
            delta = [_local(p).float() - old.float() for p, old in zip(params, before, strict=True)]
            stats.add(f"{i}/update_sumsq", _block_sumsq(delta))
        stats.all_reduce()
        sums = stats.sums
        metrics: dict[str, torch.Tensor] = {}
        for i in range(len(model.blocks)):
            for name in ("q", "k"):
                rms, maxhead = finalize_rms(stats, f"{i}/{name}")
                metrics[f"qk/layer{i}/{name}_rms"] = rms
                metrics[f"qk/layer{i}/{name}_rms_maxhead"] = maxhead
                metrics[f"qk/layer{i}/{name}_rms_pre"] = finalize_rms(stats, f"{i}/{name}_pre")[0]
                if f"{i}/{name}_gain_sum" in sums:
                    gain = sums[f"{i}/{name}_gain_sum"] / sums[f"{i}/{name}_gain_count"]
                    metrics[f"qk/layer{i}/{name}_norm_gain"] = gain
            metrics[f"attn/layer{i}/max_logit"] = stats.maxes[f"{i}/attn_max_logit_head"].max()
            if f"{i}/attn_max_softcapped_logit_head" in stats.maxes:  # after the soft-cap
                capped = stats.maxes[f"{i}/attn_max_softcapped_logit_head"].max()
                metrics[f"attn/layer{i}/max_logit_softcapped"] = capped
            entropy = sums[f"{i}/attn_entropy_sum"] / sums[f"{i}/attn_entropy_count"]
            metrics[f"attn/layer{i}/entropy"] = entropy
            metrics[f"act/layer{i}/rms"] = (sums[f"{i}/act_sumsq"] / sums[f"{i}/act_count"]).sqrt()
            if f"{i}/grad_sumsq" in sums:
                metrics[f"grad/layer{i}/norm"] = sums[f"{i}/grad_sumsq"].sqrt()
            update, weight = sums[f"{i}/update_sumsq"], sums[f"{i}/weight_sumsq"]
            metrics[f"update/layer{i}/ratio"] = (update / weight.clamp_min(1e-30)).sqrt()
        metrics["logits/max"] = stats.maxes["logits_max"]
        metrics["logits/mean_logsumexp"] = sums["logits_lse_sum"] / sums["logits_count"]
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss_spikes.state_dict(),
            "grad": self.grad_spikes.state_dict(),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss_spikes.load_state_dict(state_dict["loss"])
        self.grad_spikes.load_state_dict(state_dict["grad"])
        self._last_step = state_dict["last_step"]
