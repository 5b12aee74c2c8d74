"""Stability metric math: q/k RMS, exact max attention logit and entropy, spike scores.

Every per-batch statistic is returned as sums, counts and maxima so that values from
data-parallel ranks combine exactly (sum the sums, max the maxima) before they are
turned into RMS and means; see ``Reduction``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from olmo_mini.stability.config import StabilityConfig

# Bound on the attention logits materialized at once: B * H * chunk * T.
_PROBE_ELEMENTS = 1 << 24


@dataclass
class Reduction:
    """Named partial statistics: ``sums`` add across batches and ranks, ``maxes`` take the max."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    maxes: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def max(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.maxes[name] = torch.maximum(self.maxes[name], value) if name in self.maxes else value

    def all_reduce(self) -> None:
        """Combine across the default process group (no-op without one). Every rank must call."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for table, op in (
            (self.sums, torch.distributed.ReduceOp.SUM),
            (self.maxes, torch.distributed.ReduceOp.MAX),
        ):
            if not table:
                continue
            names = sorted(table)
            flat = torch.cat([table[n].reshape(-1) for n in names])
            torch.distributed.all_reduce(flat, op=op)
            for n, part in zip(names, flat.split([table[n].numel() for n in names]), strict=True):
                table[n] = part.view_as(table[n])


def device_scalar(value: float, device: torch.device) -> torch.Tensor:
    """``value`` as a float32 scalar on ``device``, written there by a fill kernel:
    ``torch.tensor(value, device=device)`` would copy it from host memory, a copy that makes
    the host wait on CUDA (``olmo_mini/training/syncs.py``)."""
    return torch.full((), value, dtype=torch.float32, device=device)


def rms_statistics(stats: Reduction, prefix: str, x: torch.Tensor, n_heads: int) -> None:
    """Per-head sums of squares and the per-head count of ``x``.

    ``x`` is ``[B, T, n_heads * head_dim]`` (before the head split) or ``[B, n_heads, T, head_dim]``.
    """
    x = x.detach().float()
    if x.ndim == 4:
        sumsq, count = x.square().sum(dim=(0, 2, 3)), x[:, 0].numel()
    else:
        per_head = x.reshape(-1, n_heads, x.shape[-1] // n_heads)
        sumsq, count = per_head.square().sum(dim=(0, 2)), per_head[:, 0].numel()
    stats.add(f"{prefix}_sumsq_head", sumsq)
    stats.add(f"{prefix}_count_head", device_scalar(count, x.device))


def finalize_rms(stats: Reduction, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Overall RMS and the largest per-head RMS from :func:`rms_statistics` sums (on the
    device: they reach the host with the step's other metrics)."""
    sumsq, count = stats.sums[f"{prefix}_sumsq_head"], stats.sums[f"{prefix}_count_head"]
    overall = (sumsq.sum() / (count * sumsq.numel())).sqrt()
    return overall, (sumsq / count).sqrt().max()


def causal_logit_chunks(
    q: torch.Tensor, k: torch.Tensor, scale: float
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The causal logits ``q . k * scale`` of ``q`` ``[B, H, T, D]`` and ``k`` ``[B, KV, T, D]``,
    a chunk of query rows at a time (never the full ``T x T`` matrix), as
    ``(logits [B, KV, H/KV, rows, keys], visible [rows, keys])``. GQA: query head h reads key
    head ``h // (H / KV)``; keys are broadcast over their query group, not repeated."""
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    q = q.float().reshape(batch, kv_heads, heads // kv_heads, seq, dim)
    k = k.float()[:, :, None]  # [B, KV, 1, T, D]
    chunk = max(1, min(seq, _PROBE_ELEMENTS // max(1, batch * heads * seq)))
    positions = torch.arange(seq, device=q.device)
    for start in range(0, seq, chunk):
        end = min(seq, start + chunk)
        logits = (q[..., start:end, :] @ k[..., :end, :].transpose(-1, -2)) * scale
        yield logits, positions[None, :end] <= positions[start:end, None]


@torch.no_grad()
def max_attention_logit(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact max causal logit per query head, ``[H]`` (what QK-Clip bounds on every step:
    :func:`attention_logit_statistics` without the entropy)."""
    best = device_scalar(float("-inf"), q.device)
    for logits, visible in causal_logit_chunks(q, k, scale):
        best = torch.maximum(best, logits.masked_fill(~visible, float("-inf")).amax(dim=(0, 3, 4)))
    return best.reshape(q.shape[1])


@torch.no_grad()
def attention_logit_statistics(
    stats: Reduction,
    prefix: str,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> None:
    """Exact max causal logit (per head) and attention entropy sums for ``q, k``.

    The max is of the raw logits (what QK-norm and QK-Clip bound); with a ``softcap`` also the
    max the softmax sees, ``cap * tanh(max / cap)`` (the cap is monotonic); the entropy is of
    the attention actually used (after any soft-cap).
    """
    max_per_head = device_scalar(float("-inf"), q.device)
    entropy_sum = torch.zeros((), device=q.device)
    for logits, visible in causal_logit_chunks(q, k, scale):
        masked = logits.masked_fill(~visible, float("-inf"))
        max_per_head = torch.maximum(max_per_head, masked.amax(dim=(0, 3, 4)))
        if softcap is not None:
            masked = (softcap * torch.tanh(logits / softcap)).masked_fill(~visible, float("-inf"))
        log_p = masked.log_softmax(dim=-1)
        entropy_sum += -(log_p.exp() * log_p.masked_fill(~visible, 0.0)).sum()
    batch, heads, seq, _ = q.shape
    stats.max(f"{prefix}_max_logit_head", max_per_head.reshape(heads))
    if softcap is not None:
        capped = softcap * torch.tanh(max_per_head.reshape(heads) / softcap)
        stats.max(f"{prefix}_max_softcapped_logit_head", capped)
    stats.add(f"{prefix}_entropy_sum", entropy_sum)
    stats.add(f"{prefix}_entropy_count", device_scalar(batch * heads * seq, q.device))


@torch.no_grad()
def logit_statistics(
    stats: Reduction, max_logit: torch.Tensor, lse_sum: torch.Tensor, positions: int
) -> None:
    """Output-logit max and the log Z (logsumexp) sum over ``positions`` positions: what the
    chunked LM-head loss reports, so that the full logits are never needed."""
    stats.max("logits_max", max_logit.float())
    stats.add("logits_lse_sum", lse_sum.float())
    stats.add("logits_count", device_scalar(positions, lse_sum.device))


class SpikeScore:
    """OLMo 2's spike score, online: the percentage of values at least ``sigma`` standard
    deviations from the mean of the previous ``window`` values (paper: 7 sigma, 1000).

    A value is scored once ``min_history`` earlier values exist (a handful of points gives
    no meaningful standard deviation); the standard deviation is the population one.
    Non-finite values count as spikes and stay out of the window.
    """

    def __init__(self, window: int = 1000, sigma: float = 7.0, min_history: int = 10) -> None:
        # The stability group's rules, and its messages (stability.spike_window ...).
        StabilityConfig(spike_window=window, spike_sigma=sigma, spike_min_history=min_history)
        self.sigma, self.min_history = sigma, min_history
        self.history: deque[float] = deque(maxlen=window)
        self.spikes = self.scored = 0

    def update(self, value: float) -> bool:
        """Score ``value`` against the window, then add it; returns whether it was a spike."""
        spike = False
        if not math.isfinite(value):
            spike = True
            self.scored += 1
        elif len(self.history) >= self.min_history:
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in self.history) / n)
            spike = abs(value - mean) >= self.sigma * std and value != mean
            self.scored += 1
        if math.isfinite(value):
            self.history.append(value)
        self.spikes += spike
        return spike

    @property
    def score(self) -> float:
        """Percentage of scored values that were spikes (0 before anything was scored)."""
        return 100.0 * self.spikes / self.scored if self.scored else 0.0

    def state_dict(self) -> dict:
        return {"history": list(self.history), "spikes": self.spikes, "scored": self.scored}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.spikes, self.scored = state["spikes"], state["scored"]


def spike_score(
    values: Iterable[float], window: int = 1000, sigma: float = 7.0, min_history: int = 10
) -> float:
    """Spike score of a whole series (percentage), as :class:`SpikeScore` computes it online."""
    tracker = SpikeScore(window, sigma, min_history)
    for value in values:
        tracker.update(float(value))
    return tracker.score
