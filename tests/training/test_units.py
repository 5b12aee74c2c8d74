"""Loss, optimizer groups and schedule, checked against their definitions."""

import math

import pytest
import torch

from olmo_mini.model import IGNORE_INDEX, OLMo2, OLMo2Config
from olmo_mini.sizing.flops import flops_per_token
from olmo_mini.training.optim import build_optimizer, lr_lambda, param_groups
from tests.training.helpers import compose_config


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_model_loss_is_cross_entropy_plus_z_loss_of_its_logits(softcap):
    """``model(ids, labels=...)`` (chunked LM head) equals CE + z-loss of ``model(ids)``, and
    its gradients equal those of that plain loss."""
    config = OLMo2Config(
        vocab_size=50,
        d_model=32,
        n_layers=1,
        n_heads=2,
        mlp_hidden_size=64,
        final_logit_softcap=softcap,
    )
    model = OLMo2(config)
    model.init_weights(seed=0)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, dims=1)
    labels[0, 1] = IGNORE_INDEX
    out = model(ids, labels=labels, z_loss=1e-2)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(ids).flatten(0, 1)
    keep = labels.flatten() != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(logits, labels.flatten())
    z = 1e-2 * torch.logsumexp(logits[keep], -1).square().mean()
    (ce + z).backward()
    torch.testing.assert_close(out.ce, ce.detach())
    torch.testing.assert_close(out.z, z.detach())
    torch.testing.assert_close(out.loss.detach(), (ce + z).detach())
    torch.testing.assert_close(out.max_logit, logits.detach().max())
    torch.testing.assert_close(out.lse_sum, torch.logsumexp(logits.detach(), -1).sum())
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_weight_decay_spares_only_the_embedding():
    model = OLMo2(OLMo2Config(vocab_size=64, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64))
    decayed, embedding = param_groups(model, 0.1)
    assert embedding["weight_decay"] == 0.0 and embedding["params"] == [model.embed_tokens.weight]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert "lm_head.weight" in decayed_names and "norm.weight" in decayed_names
    assert "blocks.0.attention.q_norm.weight" in decayed_names
    assert len(decayed_names) == len(names) - 1
    config = compose_config().optim
    optimizer = build_optimizer(model, config)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


def test_schedule_warms_up_linearly_then_decays_to_a_tenth():
    f = lr_lambda(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_flops_per_token_formula():
    config = OLMo2Config(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64)
    non_embedding = OLMo2(config).num_params() - 64 * 32
    assert flops_per_token(config, 16) == 6 * non_embedding + 12 * 2 * 32 * 16


def test_datasheet_peaks_match_whole_gpu_names():
    from olmo_mini.sizing.flops import datasheet_bf16_peak

    assert datasheet_bf16_peak("NVIDIA H100 80GB HBM3") == 989.5e12  # the SXM part's name
    assert datasheet_bf16_peak("NVIDIA H100 PCIe") == 756.5e12
    assert datasheet_bf16_peak("NVIDIA H200") == 989.5e12
    assert datasheet_bf16_peak("NVIDIA L4") == 121e12
    assert datasheet_bf16_peak("NVIDIA L40") is None  # not the L4, not in the table
