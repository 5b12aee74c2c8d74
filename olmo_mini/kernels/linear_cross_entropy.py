"""LM head + cross-entropy + z-loss, chunked over rows, without the full ``[N, V]`` logits.

The plain path (``lm_head`` then CE) keeps fp32 logits of ``N x V`` for backward: 262 MB
at 2048 tokens x 32k vocab, 1.6 GB at 4096 x 100k, and several passes over them (log-softmax,
its backward, the casts). Here each chunk of rows computes its logits, the loss terms and,
right away, the gradient of the loss with respect to those logits; it then multiplies that
gradient into the hidden-state and weight gradients and drops the logits. Backward only
scales the stored gradients by the incoming scalar. Same three matmuls as the plain path;
peak extra memory is one chunk of logits plus an fp32 ``[V, D]`` weight gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_ROWS = 1024


class LinearCrossEntropyOutput(NamedTuple):
    loss: torch.Tensor  # ce + z, mean over non-ignored rows; the one differentiable output
    ce: torch.Tensor  # detached
    z: torch.Tensor  # detached, already multiplied by the coefficient
    max_logit: torch.Tensor  # detached: largest (soft-capped) logit over all rows
    lse_sum: torch.Tensor  # detached: sum of logsumexp (log Z) over all rows


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and its gradients in one chunked forward; backward scales them by ``grad_loss``."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        z_coeff: float,
        softcap: float | None,
        chunk_rows: int,
        compute_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, ...]:
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp_min(1).float()
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if need_dh else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_dw else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        z_sum = ce_sum.clone()
        lse_sum = ce_sum.clone()  # over all rows: the stability monitor's log Z statistic
        max_logit = torch.full((), float("-inf"), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows].to(compute_dtype)
            target, mask = labels[rows].clamp_min(0), valid[rows]
            logits = (h @ w.t()).float()
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = softcap * capped
            target_logit = logits.gather(-1, target[:, None]).squeeze(-1)
            # logsumexp by hand, in place, so that exp(logits - max) serves the gradient too:
            # on CPU each pass over the [rows, V] fp32 chunk costs as much as a matmul.
            row_max = logits.amax(dim=-1)
            exp = logits.sub_(row_max[:, None]).exp_()
            sum_exp = exp.sum(dim=-1)
            lse = row_max + sum_exp.log()
            ce_sum += torch.where(mask, lse - target_logit, 0.0).sum()
            z_sum += torch.where(mask, lse.square(), 0.0).sum()
            lse_sum += lse.sum()
            max_logit = torch.maximum(max_logit, row_max.max())
            if not (need_dh or need_dw):
                continue
            # d(ce + z_coeff * lse^2) / d logits = softmax * (1 + 2 z_coeff lse) - onehot(target),
            # per valid row, divided by the count of valid rows (the loss is a mean).
            scale = torch.where(mask, (1 + 2 * z_coeff * lse) / count, 0.0)
            grad_logits = exp.mul_((scale / sum_exp)[:, None])
            grad_logits.scatter_add_(
                -1, target[:, None], -torch.where(mask, 1 / count, 0.0)[:, None]
            )
            if softcap is not None:
                grad_logits.mul_(1 - capped.square())
            grad_logits = grad_logits.to(compute_dtype)
            if need_dh:
                grad_hidden[rows] = grad_logits @ w
            if need_dw:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ce, z = ce_sum / count, z_coeff * z_sum / count
        ctx.mark_non_differentiable(ce, z, max_logit, lse_sum)
        return ce + z, ce, z, max_logit, lse_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *unused: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        dw = None if grad_weight is None else grad_weight * grad_loss
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> LinearCrossEntropyOutput:
    """Mean over non-ignored rows of ``CE(hidden @ weight.T, labels) + z_loss * lse**2``.

    ``hidden`` ``[..., D]``, ``weight`` ``[V, D]`` (the LM head), ``labels`` ``[...]`` with
    ``IGNORE_INDEX`` for rows that do not count. ``softcap`` applies ``cap * tanh(z / cap)``
    to the logits first. Under autocast the matmuls run in the autocast dtype, as
    ``F.linear`` would; the weight gradient is accumulated in fp32. With gradients disabled
    (evaluation) only the loss is computed.
    """
    if not torch.is_grad_enabled():  # needs_input_grad ignores the grad mode
        hidden, weight = hidden.detach(), weight.detach()
    device_type = hidden.device.type
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        loss, ce, z, max_logit, lse_sum = _LinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1),
            float(z_loss),
            softcap,
            chunk_rows,
            compute_dtype,
        )
    return LinearCrossEntropyOutput(loss, ce, z, max_logit, lse_sum)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> LinearCrossEntropyOutput:
    """The plain path: full logits, fp32 logsumexp; what the chunked version must equal."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp_min(1)
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    ce = torch.where(valid, lse - target, 0.0).sum() / count
    z = z_loss * torch.where(valid, lse.square(), 0.0).sum() / count
    return LinearCrossEntropyOutput(
        ce + z, ce.detach(), z.detach(), logits.max().detach(), lse.sum().detach()
    )
