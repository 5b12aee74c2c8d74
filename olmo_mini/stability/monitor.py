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

import math
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
    finalize_rms,
    rms_statistics,
)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter or gradient."""
    return t.to_local() if hasattr(t, "to_local") else t


def _block_sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares over this rank's shards (a partial sum under FSDP, summed over ranks later)."""
    return torch.stack([_local(t).detach().float().square().sum() for t in tensors]).sum()


class StabilityMonitor(L.Callback):
    """Logs ``qk/``, ``attn/``, ``act/``, ``grad/``, ``update/``, ``logits/`` and ``stability/``.

    The LightningModule must expose ``model`` (an ``OLMo2``), ``flush_listeners`` (called
    with every step's ``train/loss`` and ``train/grad_norm`` once they reach the host: the
    spike scores see every step without a host sync per step) and, on measuring steps,
    ``logit_stats`` (a ``Reduction`` with the loss's logit statistics).
    """

    def __init__(self, config: StabilityConfig) -> None:
        self.config = config
        spikes = (config.spike_window, config.spike_sigma, config.spike_min_history)
        self.loss_spikes, self.grad_spikes = SpikeScore(*spikes), SpikeScore(*spikes)
        self._stats: Reduction | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._before_step: list[list[torch.Tensor]] | None = None
        self._last_step = 0  # the last step scored for spikes
        self._loggers: list = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._loggers = trainer.loggers
        pl_module.flush_listeners.append(self._score_spikes)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.flush_listeners.remove(self._score_spikes)

    def _score_spikes(self, step_metrics: dict[str, float]) -> None:
        """Spike scores for one step, logged at that step; every step is scored once."""
        step = int(step_metrics["step"])
        if step <= self._last_step:
            return
        self._last_step = step
        self.loss_spikes.update(step_metrics["train/loss"])
        self.grad_spikes.update(step_metrics["train/grad_norm"])
        metrics = {
            "stability/spike_score_loss": self.loss_spikes.score,
            "stability/spike_score_grad": self.grad_spikes.score,
        }
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)

    # -- which steps measure -------------------------------------------------------------
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
            pl_module.logit_stats = Reduction()
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
                attention_logit_statistics(stats, f"{i}/attn", q, k, attn.softmax_scale, attn.softcap)

            def output(_m: nn.Module, _args: tuple, out: torch.Tensor, i: int = i):
                stats.add(f"{i}/act_sumsq", out.detach().float().square().sum())
                stats.add(f"{i}/act_count", torch.tensor(float(out.numel()), device=out.device))

            handles.append(attn.pre_norm_probe.register_forward_hook(pre_norm))
            handles.append(attn.logit_probe.register_forward_hook(logits))
            handles.append(block.register_forward_hook(output))
        return handles

    # -- gradients before clipping, weights before the update ------------------------------
    def on_before_optimizer_step(
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
            for name in ("q", "k"):
                norm = getattr(attn, f"{name}_norm", None)
                if norm is not None and norm.weight is not None:
                    w = _local(norm.weight).detach().float()
                    self._stats.add(f"{i}/{name}_gain_sum", w.abs().sum())
                    self._stats.add(f"{i}/{name}_gain_count", torch.tensor(float(w.numel()), device=w.device))

    # -- after the step: update ratios, reduce, log ----------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if self._before_step is None:
            return  # not a measuring step's optimizer step (or mid-accumulation)
        metrics = self._finish_measurement(pl_module)
        self._stats, self._before_step = None, None
        for logger in trainer.loggers:  # every measurement, whatever log_every_n_steps is
            logger.log_metrics(metrics, step=trainer.global_step)

    def _finish_measurement(self, pl_module: L.LightningModule) -> dict[str, float]:
        stats = self._stats
        model: OLMo2 = pl_module.model
        for i, (block, before) in enumerate(zip(model.blocks, self._before_step, strict=True)):
            params = [p for p in block.parameters() if p.requires_grad]
            delta = [_local(p).detach().float() - old.float() for p, old in zip(params, before, strict=True)]
            stats.add(f"{i}/update_sumsq", torch.stack([d.square().sum() for d in delta]).sum())
        logit_stats: Reduction | None = pl_module.logit_stats
        pl_module.logit_stats = None
        if logit_stats is not None:
            stats.sums.update(logit_stats.sums)
            stats.maxes.update(logit_stats.maxes)
        stats.all_reduce()

        metrics: dict[str, float] = {}
        for i in range(len(model.blocks)):
            for name in ("q", "k"):
                rms, maxhead = finalize_rms(stats, f"{i}/{name}")
                metrics[f"qk/layer{i}/{name}_rms"] = rms
                metrics[f"qk/layer{i}/{name}_rms_maxhead"] = maxhead
                metrics[f"qk/layer{i}/{name}_rms_pre"] = finalize_rms(stats, f"{i}/{name}_pre")[0]
                if f"{i}/{name}_gain_sum" in stats.sums:
                    gain = stats.sums[f"{i}/{name}_gain_sum"] / stats.sums[f"{i}/{name}_gain_count"]
                    metrics[f"qk/layer{i}/{name}_norm_gain"] = gain.item()
            metrics[f"attn/layer{i}/max_logit"] = stats.maxes[f"{i}/attn_max_logit_head"].max().item()
            entropy = stats.sums[f"{i}/attn_entropy_sum"] / stats.sums[f"{i}/attn_entropy_count"]
            metrics[f"attn/layer{i}/entropy"] = entropy.item()
            act = stats.sums[f"{i}/act_sumsq"] / stats.sums[f"{i}/act_count"]
            metrics[f"act/layer{i}/rms"] = math.sqrt(act.item())
            if f"{i}/grad_sumsq" in stats.sums:
                metrics[f"grad/layer{i}/norm"] = math.sqrt(stats.sums[f"{i}/grad_sumsq"].item())
            update, weight = stats.sums[f"{i}/update_sumsq"], stats.sums[f"{i}/weight_sumsq"]
            metrics[f"update/layer{i}/ratio"] = math.sqrt(update.item() / max(weight.item(), 1e-30))
        if "logits_max" in stats.maxes:
            metrics["logits/max"] = stats.maxes["logits_max"].item()
            lse = stats.sums["logits_lse_sum"] / stats.sums["logits_count"]
            metrics["logits/mean_logsumexp"] = lse.item()
        return metrics

    # -- checkpointed state: the spike-score windows ---------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss_spikes.state_dict(), "grad": self.grad_spikes.state_dict(),
                "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss_spikes.load_state_dict(state_dict["loss"])
        self.grad_spikes.load_state_dict(state_dict["grad"])
        self._last_step = state_dict["last_step"]
