"""Stability interventions against plain-torch references written out by hand here."""

from __future__ import annotations

import math

import pytest
import torch

from olmo_mini import OLMo2, OLMo2Config
from olmo_mini.model.model import Attention, Norm

BASE = dict(
    vocab_size=96,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    mlp_hidden_size=48,
    max_seq_len=16,
)


def _rope(x: torch.Tensor, seq: int, head_dim: int, theta: float) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq).float(), inv)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def reference_attention(attn: Attention, x: torch.Tensor, config: OLMo2Config) -> torch.Tensor:
    """The attention sublayer written out step by step for every qk_norm flavour."""
    b, t, _ = x.shape
    h, hk, d = config.n_heads, config.n_kv_heads, config.head_dim
    q, k, v = x @ attn.q_proj.weight.T, x @ attn.k_proj.weight.T, x @ attn.v_proj.weight.T
    eps = config.norm_eps
    if config.qk_norm in ("full", "qkv"):
        q, k = _rms(q, attn.q_norm.weight, eps), _rms(k, attn.k_norm.weight, eps)
    if config.qk_norm == "qkv":
        v = _rms(v, attn.v_norm.weight, eps)
    q = q.view(b, t, h, d).transpose(1, 2)
    k = k.view(b, t, hk, d).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    v = v.view(b, t, hk, d).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    if config.qk_norm == "head":
        q, k = _rms(q, attn.q_norm.weight, eps), _rms(k, attn.k_norm.weight, eps)
    if config.qk_norm == "l2":
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    q, k = _rope(q, t, d, config.rope_theta), _rope(k, t, d, config.rope_theta)
    if config.qk_norm == "l2":
        logits = attn.qk_scale * (q @ k.transpose(-1, -2))
    else:
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if config.attn_logit_softcap is not None:
        cap = config.attn_logit_softcap
        logits = cap * torch.tanh(logits / cap)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, t, h * d)
    return out @ attn.o_proj.weight.T


def _perturbed_model(config: OLMo2Config) -> OLMo2:
    model = OLMo2(config)
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
            elif "proj" in name:  # larger weights so that soft-capping is active
                param.mul_(8)
    return model


@pytest.mark.parametrize(
    "variant",
    [
        dict(qk_norm="full"),
        dict(qk_norm="head"),
        dict(qk_norm="none"),
        dict(qk_norm="l2"),
        dict(qk_norm="qkv"),
        dict(qk_norm="none", attn_logit_softcap=5.0),
        dict(qk_norm="full", attn_logit_softcap=2.0),
    ],
    ids=str,
)
def test_attention_variant_matches_reference_values_and_gradients(variant: dict) -> None:
    config = OLMo2Config(**BASE, **variant)
    attn = _perturbed_model(config).blocks[0].attention
    x = torch.randn(2, 9, config.d_model, generator=torch.Generator().manual_seed(2))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    cos, sin = OLMo2(config).rope_tables(9)

    ours = attn(x_ours, cos, sin)
    ours.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    attn.zero_grad()
    ref = reference_attention(attn, x_ref, config)
    ref.square().sum().backward()

    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name, param in attn.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_softcap_bounds_attention_logits_and_changes_output() -> None:
    capped = OLMo2Config(**BASE, qk_norm="none", attn_logit_softcap=1.0)
    model = _perturbed_model(capped)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
        model.blocks[0].attention.softcap = None
        model.blocks[1].attention.softcap = None
        assert (model(ids) - out).abs().max() > 1e-3


def test_softcapped_attention_with_kv_cache_equals_full_forward() -> None:
    model = _perturbed_model(OLMo2Config(**BASE, attn_logit_softcap=3.0))
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 10)
    with torch.no_grad():
        full = model(ids)
        steps = torch.cat([model(ids[:, :6], cache), model(ids[:, 6:], cache)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)


def test_final_logit_softcap() -> None:
    model = _perturbed_model(OLMo2Config(**BASE, final_logit_softcap=0.1))
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        hidden = model.hidden_states(ids)
        raw = hidden @ model.lm_head.weight.T
        torch.testing.assert_close(model(ids), 0.1 * torch.tanh(raw / 0.1))
        assert model(ids).abs().max() < 0.1 and raw.abs().max() > 0.1


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_reference(affine: bool) -> None:
    config = OLMo2Config(**BASE, norm_type="layer", norm_affine=affine)
    norm = Norm(32, config)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    else:
        assert norm.weight is None and not list(norm.parameters())
    x = (3 * torch.randn(4, 5, 32) + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    mean = x_ref.mean(-1, keepdim=True)
    var = ((x_ref - mean) ** 2).mean(-1, keepdim=True)
    ref = (x_ref - mean) / torch.sqrt(var + config.norm_eps)
    if affine:
        ref = ref * norm.weight
    out = norm(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.pow(3).sum().backward()
    ref.pow(3).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    residual = torch.randn(4, 5, 32)
    torch.testing.assert_close(norm.add(residual, x), residual + out)


def test_non_parametric_rms_norm_has_no_weights() -> None:
    model = OLMo2(OLMo2Config(**BASE, norm_affine=False))
    assert not [n for n, _ in model.named_parameters() if "norm" in n]
    x = torch.randn(3, 32)
    torch.testing.assert_close(model.norm(x), _rms(x, None, 1e-6))


def test_l2_scale_starts_at_henry_heuristic() -> None:
    attn = OLMo2(OLMo2Config(**BASE, qk_norm="l2")).blocks[0].attention
    assert attn.qk_scale.item() == pytest.approx(math.log2(16 * 16 - 16))
