"""Chunked LM head + CE + z-loss against the plain full-logits path: values and gradients."""

from __future__ import annotations

import pytest
import torch

from olmo_mini.kernels.linear_cross_entropy import (
    IGNORE_INDEX,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

N, D, V = 37, 24, 101  # 37 rows in chunks of 8: the last chunk is partial


def _inputs(seed: int, ignore: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.5
    labels = torch.randint(0, V, (N,), generator=gen)
    if ignore:
        labels[::3] = IGNORE_INDEX
    return hidden, weight, labels


def _run(fn, hidden, weight, labels, dtype, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = fn(h, w, labels, **kwargs)
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_matches_reference(dtype: torch.dtype, ignore: bool, softcap: float | None) -> None:
    hidden, weight, labels = _inputs(0, ignore)
    kwargs = dict(z_loss=1e-2, softcap=softcap)
    ours, dh, dw = _run(linear_cross_entropy, hidden, weight, labels, dtype, chunk_rows=8, **kwargs)
    ref, dh_ref, dw_ref = _run(
        linear_cross_entropy_reference, hidden, weight, labels, dtype, **kwargs
    )
    # bf16: the same bf16 logits go into both, but the chunked path rounds its logit
    # gradient to bf16 before the matmuls while the plain path's autocast backward does too,
    # only in a different order; a few bf16 ulps of the gradients' scale.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for name in ("loss", "ce", "z", "max_logit", "lse_sum"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **tol, msg=name)
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    torch.testing.assert_close(dh, dh_ref, **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)
    assert ours.z > 0 and ours.loss.requires_grad and not ours.ce.requires_grad


def test_scales_with_upstream_gradient_and_batch_shape() -> None:
    """``2 * loss`` doubles the gradients; ``[B, T, D]`` inputs equal their flattened rows."""
    hidden, weight, labels = _inputs(1, ignore=True)
    h = hidden.reshape(1, N, D).clone().requires_grad_()
    w = weight.clone().requires_grad_()
    (
        2 * linear_cross_entropy(h, w, labels.reshape(1, N), z_loss=1e-3, chunk_rows=5).loss
    ).backward()
    _, dh_ref, dw_ref = _run(
        linear_cross_entropy_reference, hidden, weight, labels, torch.float32, z_loss=1e-3
    )
    torch.testing.assert_close(h.grad.reshape(N, D), 2 * dh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, 2 * dw_ref, rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_gradients() -> None:
    hidden, weight, labels = _inputs(2, ignore=False)
    labels[:] = IGNORE_INDEX
    out, dh, dw = _run(linear_cross_entropy, hidden, weight, labels, torch.float32, z_loss=1e-2)
    assert out.loss.item() == 0.0
    assert not dh.any() and not dw.any()


def test_no_grad_computes_loss_only(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, weight, labels = _inputs(3, ignore=False)
    hidden.requires_grad_(), weight.requires_grad_()
    scatters = []
    original = torch.Tensor.scatter_add_
    monkeypatch.setattr(
        torch.Tensor, "scatter_add_", lambda *a, **k: scatters.append(1) or original(*a, **k)
    )
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, labels, chunk_rows=8)
    assert not scatters, "the logit gradient was computed under no_grad"
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    torch.testing.assert_close(out.loss, ref.loss)
    assert not out.loss.requires_grad
