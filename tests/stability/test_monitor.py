"""The stability monitor logs what a direct measurement on the same batch and weights gives."""

from __future__ import annotations

import math

import pytest
import torch

from olmo_mini.data import OLMoDataModule
from olmo_mini.model import OLMo2
from olmo_mini.training import train
from tests.training.helpers import compose_config, metrics


def _logged(run_dir, step: int) -> dict[str, float]:
    row: dict[str, float] = {}
    for r in metrics(run_dir):
        if r.get("step") and int(float(r["step"])) == step:
            row.update({k: float(v) for k, v in r.items() if v})
    return row


def _direct_measurement(config) -> dict[str, float]:
    """Step 1 by hand: the seeded init, the first global batch, hooks on the probes."""
    model = OLMo2(config.model)
    model.init_weights(config.seed)
    data = OLMoDataModule(config.data, config.seed, rank=0, world_size=1)
    data.prepare_data()
    data.setup("fit")
    loader = iter(data.train_dataloader())
    captured: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(_module, args, _out):
            captured.setdefault(name + "_k", []).append(args[1].detach())
            captured.setdefault(name + "_q", []).append(args[0].detach())

        return hook

    block0 = model.blocks[0]
    block0.attention.pre_norm_probe.register_forward_hook(keep("pre"))
    block0.attention.logit_probe.register_forward_hook(keep("logit"))
    accum = config.grad_accum_steps
    logits_max, lse = [], []
    for _ in range(accum):
        batch = next(loader)
        logits = model(batch["input_ids"])
        logits_max.append(logits.detach().amax())
        lse.append(torch.logsumexp(logits.detach(), -1).flatten())
        flat = logits.flatten(0, 1)
        z = config.optim.z_loss * torch.logsumexp(flat, -1).square().mean()
        loss = torch.nn.functional.cross_entropy(flat, batch["labels"].flatten()) + z
        (loss / accum).backward()

    q = torch.cat(captured["logit_q"])  # [B, H, T, D]
    k = torch.cat(captured["logit_k"])
    seq = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, -math.inf).softmax(-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean()
    grad = torch.sqrt(sum(p.grad.square().sum() for p in block0.parameters()))
    per_head_q = q.square().mean(dim=(0, 2, 3)).sqrt()
    return {
        "qk/layer0/q_rms": q.square().mean().sqrt().item(),
        "qk/layer0/k_rms": k.square().mean().sqrt().item(),
        "qk/layer0/q_rms_maxhead": per_head_q.max().item(),
        "qk/layer0/q_rms_pre": torch.cat(captured["pre_q"]).square().mean().sqrt().item(),
        "qk/layer0/k_rms_pre": torch.cat(captured["pre_k"]).square().mean().sqrt().item(),
        "attn/layer0/max_logit": scores.masked_fill(~causal, -math.inf).max().item(),
        "attn/layer0/entropy": entropy.item(),
        "grad/layer0/norm": grad.item(),
        "logits/max": torch.stack(logits_max).max().item(),
        "logits/mean_logsumexp": torch.cat(lse).mean().item(),
    }


def test_logged_stability_values_equal_direct_measurement(tmp_path) -> None:
    config = compose_config("debug=smoke", "trainer.max_steps=2", "stability.every_n_steps=2")
    train(config, tmp_path)
    logged = _logged(tmp_path, 1)
    for key, value in _direct_measurement(config).items():
        assert logged[key] == pytest.approx(value, rel=1e-4), key
    assert logged["qk/layer0/q_norm_gain"] == pytest.approx(1.0)  # norm weights start at 1
    assert 0 < logged["update/layer0/ratio"] < 0.1
    assert "attn/layer1/max_logit" in _logged(tmp_path, 2)
    assert "attn/layer0/max_logit_softcapped" not in logged  # no soft-cap, no second value


def test_softcapped_runs_log_the_max_logit_before_and_after_the_cap(tmp_path) -> None:
    cap = 0.5  # below the raw logits of a fresh model, so that the cap bites
    config = compose_config("debug=smoke", "trainer.max_steps=1", f"model.attn_logit_softcap={cap}")
    train(config, tmp_path)
    logged = _logged(tmp_path, 1)
    for layer in range(config.model.n_layers):
        raw, capped = (
            logged[f"attn/layer{layer}/{k}"] for k in ("max_logit", "max_logit_softcapped")
        )
        assert capped == pytest.approx(cap * math.tanh(raw / cap), rel=1e-6) and capped < cap
