"""``optim.*`` study options (weight-decay mode and embedding decay, epsilon, warmup, constant
schedule, absolute minimum LR, clipping off) against AdamW and schedules by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from olmo_mini.config import ConfigError
from olmo_mini.training.optim import build_optimizer, build_scheduler
from tests.training.helpers import compose_config, series

LR, BETA1, BETA2 = 0.01, 0.9, 0.95
# optim.warmup_steps=2, trainer.max_steps=4, min_lr_ratio=0.1: the schedule's multipliers s_t.
MULTIPLIERS = [0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))]


class Tiny(nn.Module):
    """One decayed matrix and an embedding, which OLMo 2's groups never decay."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, 6).reshape(2, 3))
        self.embed_tokens = nn.Embedding(2, 3)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.linspace(0.5, 1.5, 6).reshape(2, 3))


def gradient(step: int, like: torch.Tensor) -> torch.Tensor:
    """Gradients small enough (~1e-6) that epsilon visibly changes Adam's step."""
    return 1e-6 * torch.cos(torch.arange(like.numel(), dtype=torch.float64) + step).reshape(
        like.shape
    )


def adamw_by_hand(theta: torch.Tensor, decay: list[float], eps: float) -> torch.Tensor:
    """``θ ← θ(1 − decay_t)``, then ``θ ← θ − s_t·lr·m̂/(√v̂ + ε)`` with bias-corrected moments."""
    theta = theta.double()
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    for t, (s, d) in enumerate(zip(MULTIPLIERS, decay, strict=True), start=1):
        g = gradient(t, theta)
        theta = theta * (1 - d)
        m, v = BETA1 * m + (1 - BETA1) * g, BETA2 * v + (1 - BETA2) * g * g
        m_hat, v_hat = m / (1 - BETA1**t), v / (1 - BETA2**t)
        theta = theta - s * LR * m_hat / (v_hat.sqrt() + eps)
    return theta


def train_tiny(*overrides: str) -> Tiny:
    config = compose_config(
        f"optim.lr={LR}", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1", *overrides
    )
    model = Tiny()
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, max_steps=4)
    for t in range(1, 5):
        for param in model.parameters():
            param.grad = gradient(t, param).float()
        optimizer.step()
        scheduler.step()
    return model


@pytest.mark.parametrize("eps", [1e-8, 1e-6])
def test_coupled_decay_is_lr_times_weight_decay(eps):
    model = train_tiny("optim.weight_decay=0.5", f"optim.eps={eps}")
    decay = [s * LR * 0.5 for s in MULTIPLIERS]
    torch.testing.assert_close(model.weight, adamw_by_hand(Tiny().weight, decay, eps).float())


@pytest.mark.parametrize("eps", [1e-8, 1e-6])
def test_independent_decay_follows_the_schedule_but_not_the_peak_lr(eps):
    model = train_tiny(
        "optim.weight_decay=0.05", "optim.weight_decay_mode=independent", f"optim.eps={eps}"
    )
    decay = [s * 0.05 for s in MULTIPLIERS]  # s_t·λ: 100× what coupled decay would take here
    torch.testing.assert_close(model.weight, adamw_by_hand(Tiny().weight, decay, eps).float())
    embedding = adamw_by_hand(Tiny().embed_tokens.weight, [0.0] * 4, eps)
    torch.testing.assert_close(model.embed_tokens.weight, embedding.float())


def test_warmup_length_sets_the_linear_ramp():
    config = compose_config("optim.lr=1.0", "optim.warmup_steps=4")
    optimizer = build_optimizer(Tiny(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, max_steps=100)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_embedding_weight_decay_decays_the_embedding_like_the_rest():
    model = train_tiny(
        "optim.weight_decay=0.05",
        "optim.weight_decay_mode=independent",
        "optim.embedding_weight_decay=true",
    )
    decay = [s * 0.05 for s in MULTIPLIERS]
    embedding = adamw_by_hand(Tiny().embed_tokens.weight, decay, 1e-8)
    torch.testing.assert_close(model.embed_tokens.weight, embedding.float())


def lrs_over(steps: int, *overrides: str, max_steps: int = 6) -> list[float]:
    """The LR of each of the first ``steps`` optimizer steps."""
    config = compose_config(*overrides)
    optimizer = build_optimizer(Tiny(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, max_steps=max_steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_constant_schedule_holds_the_peak_after_warmup():
    lrs = lrs_over(8, "optim.lr=0.1", "optim.warmup_steps=2", "optim.schedule=constant")
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], rel=1e-12)


def test_cosine_to_an_absolute_minimum_lr():
    # Peak 0.1, warmup 2 (0.05, 0.1), 6 steps: the cosine runs over 0-based steps 2..6
    # (progress (t - 2) / 4) from 0.1 to 1e-5, then stays there; halfway it is (0.1 + 1e-5) / 2.
    lrs = lrs_over(8, "optim.lr=0.1", "optim.warmup_steps=2", "optim.min_lr=1e-5")
    half_cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    expected = [0.05, 0.1] + [1e-5 + (0.1 - 1e-5) * c for c in half_cos] + [1e-5]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[4] == pytest.approx(0.050005, rel=1e-9) and lrs[6] == pytest.approx(1e-5)
    # The same end point whatever the peak (min_lr_ratio would scale with it).
    assert lrs_over(8, "optim.lr=0.3", "optim.warmup_steps=2", "optim.min_lr=1e-5")[-1] == 1e-5


def test_grad_clip_null_turns_clipping_off(tmp_path):
    from olmo_mini.training.run import train

    base = ("debug=smoke", "trainer.max_steps=3", "trainer.accelerator=cpu", "optim.lr=0.01")
    runs = {}
    for clip in ("null", "1e9", "0.01"):
        train(compose_config(*base, f"optim.grad_clip={clip}"), tmp_path / clip)
        runs[clip] = (
            series(tmp_path / clip, "train/ce_loss"),
            series(tmp_path / clip, "train/grad_norm"),
        )
    assert compose_config("optim.grad_clip=null").optim.grad_clip is None
    assert runs["null"] == runs["1e9"]  # never clipped: the same run, bit for bit
    assert runs["0.01"][0][3] != runs["null"][0][3]  # clipped: another run
    assert min(runs["null"][1].values()) > 0.01


def test_bad_optimizer_options_name_the_field():
    with pytest.raises(ConfigError, match="optim.weight_decay_mode"):
        compose_config("optim.weight_decay_mode=scaled")
    with pytest.raises(ConfigError, match="optim.qk_clip_tau"):
        compose_config("optim.qk_clip_tau=0")
    with pytest.raises(ConfigError, match="optim.schedule must be one of"):
        compose_config("optim.schedule=linear")
    with pytest.raises(ConfigError, match=r"optim.min_lr must be a number in \[0, optim.lr"):
        compose_config("optim.lr=1e-3", "optim.min_lr=0.01")
    with pytest.raises(ConfigError, match="optim.grad_clip must be a positive number"):
        compose_config("optim.grad_clip=0")


def test_wortsman_presets_compose_and_train_a_few_steps(tmp_path):
    from olmo_mini.model.model import GeluMLP, OLMo2
    from olmo_mini.training.run import train

    presets = ("model=wortsman", "optim=wortsman")
    config = compose_config(*presets)
    model, optim = config.model, config.optim
    assert (model.block, model.norm_type, model.qk_norm, model.mlp, model.init) == (
        "pre",
        "layer",
        "head",
        "gelu",
        "wortsman",
    )
    assert model.mlp_hidden_size == 4 * model.d_model and model.norm_affine
    assert (optim.beta1, optim.beta2, optim.eps, optim.grad_clip) == (0.9, 0.95, 1e-8, 1.0)
    assert (optim.weight_decay, optim.weight_decay_mode, optim.z_loss) == (
        1e-4,
        "independent",
        1e-4,
    )
    assert optim.embedding_weight_decay and optim.min_lr == 1e-5 and optim.schedule == "cosine"
    block = OLMo2(model).blocks[0]
    assert isinstance(block.mlp, GeluMLP) and not block.reordered
    assert block.attention.q_norm.kind == "layer" and block.attention.q_norm.weight.shape == (64,)
    # debug=smoke's shape (d_model 64), their MLP width 4·64; four steps (warmup 2) train.
    run = (*presets, "debug=smoke", "model.mlp_hidden_size=256", "trainer.max_steps=4")
    train(compose_config(*run, "trainer.accelerator=cpu"), tmp_path)
    losses = series(tmp_path, "train/ce_loss")
    assert len(losses) == 4 and all(map(math.isfinite, losses.values()))
    assert series(tmp_path, "val/loss")[4] < losses[1]
    # Halfway down the cosine from the peak 3e-3 to the absolute 1e-5.
    assert series(tmp_path, "train/lr")[4] == pytest.approx((3e-3 + 1e-5) / 2)
