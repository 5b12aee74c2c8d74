"""QK-Clip against hand references: the exact max logit, the clip for each ``qk_norm``
flavour with GQA, the logit bound in a real run, and FSDP equal to one process."""

from __future__ import annotations

from collections import deque

import lightning as L
import pytest
import torch

from olmo_mini.config import ConfigError, TrainConfig
from olmo_mini.model import OLMo2, OLMo2Config
from olmo_mini.stability import metrics
from olmo_mini.stability.metrics import max_attention_logit
from olmo_mini.training import train
from olmo_mini.training.qk_clip import check_supported, clip_model
from tests.training.helpers import check, compose_config, overridden, run_train, series


def reference_max_logits(model: OLMo2, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-layer, per-head max causal logit ``[n_layers, H]``: full ``T x T`` matrices of the
    q and k that enter attention, keys repeated for their query group."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        block.attention.logit_probe.register_forward_hook(
            lambda _m, args, _out: captured.append((args[0].detach(), args[1].detach()))
        )
        for block in model.blocks
    ]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()
    maxima = []
    for block, (q, k) in zip(model.blocks, captured, strict=True):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q.double() @ k.double().transpose(-1, -2)) * block.attention.softmax_scale
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
        maxima.append(logits.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3)))
    return torch.stack(maxima).float()


def test_max_attention_logit_is_exact_in_chunks_with_gqa(monkeypatch):
    monkeypatch.setattr(metrics, "_PROBE_ELEMENTS", 2 * 4 * 9 * 2)  # two query rows per chunk
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    k_rep = k.repeat_interleave(2, dim=1)
    logits = (q @ k_rep.transpose(-1, -2)) * 0.3
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    expected = logits.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(max_attention_logit(q, k, 0.3), expected)


def _model(qk_norm: str) -> OLMo2:
    config = OLMo2Config(
        vocab_size=64,
        d_model=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden_size=64,
        max_seq_len=16,
        qk_norm=qk_norm,
    )
    model = OLMo2(config)
    model.init_weights(0)
    return model


@pytest.mark.parametrize("qk_norm", ["none", "full", "qkv"])
def test_clip_brings_each_clipped_head_to_tau_and_leaves_the_others(qk_norm):
    """GQA with 2 query heads per key head: heads 0 (group 0) and 3 (group 1) are boosted so
    that each group has one head above tau and one below."""
    model = _model(qk_norm)
    attn = model.blocks[0].attention
    q_weight = attn.q_proj.weight if qk_norm == "none" else attn.q_norm.weight
    with torch.no_grad():
        q_weight[0:8] *= 4.0  # head 0's rows
        q_weight[24:32] *= 3.0  # head 3's
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    before = reference_max_logits(model, ids)
    tau = float(before[0, [1, 2]].max() + before[0, [0, 3]].min()) / 2
    assert (before[0] > tau).tolist() == [True, False, False, True]

    clip_model(model, before, tau)

    after = reference_max_logits(model, ids)
    expected = torch.where(before > tau, torch.full_like(before, tau), before)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("qk_norm", ["head", "l2"])
def test_clip_with_a_shared_weight_scales_every_head_by_the_smallest_factor(qk_norm):
    model = _model(qk_norm)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    before = reference_max_logits(model, ids)
    tau = 0.7 * float(before.max())

    clip_model(model, before, tau)

    after = reference_max_logits(model, ids)
    torch.testing.assert_close(after, before * (tau / before.max()), rtol=1e-5, atol=0)


def test_qk_clip_needs_a_weight_behind_the_qk_norm():
    for qk_norm in ("full", "head"):
        with pytest.raises(ConfigError, match="norm_affine"):
            check_supported(OLMo2Config(qk_norm=qk_norm, norm_affine=False))
    check_supported(OLMo2Config(qk_norm="none", norm_affine=False))


# A run whose attention logits grow past TAU within a few steps (no QK-norm, high LR); the
# cosine ends at LR 0 so that the last update barely moves the weights after the last clip.
TAU = 20.0
RUN = [
    "debug=smoke",
    "model.qk_norm=none",
    "optim.lr=0.1",
    "optim.min_lr_ratio=0",
    "data.micro_batch_size=4",
    "trainer.max_steps=10",
    "trainer.val_check_interval=10",
    "trainer.accelerator=cpu",
    "stability.every_n_steps=3",
]


class LastStep(L.Callback):
    """Keeps the last optimizer step's micro-batches and the weights the run ends with."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.batches: deque[torch.Tensor] = deque(maxlen=config.grad_accum_steps)
        self.state: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch["input_ids"].clone())

    def on_train_end(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def final_max_logits(self) -> torch.Tensor:
        """The last step's batch through the final weights: the forward after the last clip."""
        model = OLMo2(self.config.model)
        model.load_state_dict(self.state)
        return reference_max_logits(model, torch.cat(list(self.batches)))


def _run(run_dir, *overrides: str) -> LastStep:
    last = LastStep(compose_config(*RUN, *overrides))
    train(last.config, run_dir, callbacks=[last])
    return last


def test_qk_clip_bounds_the_max_logit_of_a_run_that_exceeds_tau_without_it(tmp_path):
    unclipped = _run(tmp_path / "unclipped")
    logged = [series(tmp_path / "unclipped", f"attn/layer{i}/max_logit") for i in range(2)]
    assert max(max(s.values()) for s in logged) > 3 * TAU
    assert unclipped.final_max_logits().max() > 3 * TAU

    run_dir = tmp_path / "clipped"
    clipped = _run(run_dir, f"optim.qk_clip_tau={TAU}")
    # The monitor logs each step's forward, before that step's clip, when the last update has
    # already grown the logits again; on the weights right after the last clip, where the
    # cosine has taken the LR to ~0, the largest head sits at tau.
    assert clipped.final_max_logits().max() == pytest.approx(TAU, rel=0.1)
    for i in range(2):
        monitor = series(run_dir, f"attn/layer{i}/max_logit")
        own = series(run_dir, f"qk_clip/layer{i}/max_logit")
        assert sorted(monitor) == [1, 3, 6, 9]
        for step, value in monitor.items():  # the clip's measurement is the monitor's
            assert own[step] == pytest.approx(value, rel=1e-5), (i, step)
    clipped_heads = [series(run_dir, f"qk_clip/layer{i}/clipped_heads") for i in range(2)]
    assert sum(sum(s.values()) for s in clipped_heads) > 0


# GQA (2 query heads per key head, each rank holding its own heads' rows), at an LR where one
# process and two agree to 1e-4 before any clip; tau is passed within the first steps.
FSDP_RUN = overridden(
    RUN,
    "optim.lr=1e-2",
    "optim.qk_clip_tau=0.1",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "trainer.max_steps=6",
    "trainer.val_check_interval=6",
    "stability.enabled=false",
)


def _final_weights(checkpoint) -> dict[str, torch.Tensor]:
    """The q/k projection weights of a single-file or (converted) sharded checkpoint."""
    if not (checkpoint / "state.ckpt").is_file():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(checkpoint, checkpoint / "state.ckpt")
    state = torch.load(checkpoint / "state.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.endswith(("q_proj.weight", "k_proj.weight"))}


@pytest.mark.slow
def test_fsdp_two_processes_clip_like_one(tmp_path):
    """Sharded q/k rows are scaled by the factors of their own heads, from maxima reduced over
    ranks: the final q/k weights, losses and max logits equal one process's."""
    run = [*FSDP_RUN, "checkpoint.save_final=true"]
    train(compose_config(*run), tmp_path / "single")
    check(run_train(tmp_path / "fsdp", *run, "trainer=fsdp", "trainer.devices=2"))
    clipped = series(tmp_path / "single", "qk_clip/layer1/clipped_heads")
    assert sum(clipped.values()) > 0
    one, two = (_final_weights(tmp_path / d / "checkpoints" / "step_6") for d in ("single", "fsdp"))
    assert sorted(one) == sorted(two) and len(one) == 4
    for name, weight in one.items():  # weights ~0.1; the two runs' Adam noise stays < 5e-6
        torch.testing.assert_close(two[name], weight, rtol=1e-4, atol=1e-5)
    keys = ["train/loss", "val/loss"] + [
        f"qk_clip/layer{i}/{name}" for i in range(2) for name in ("max_logit", "clipped_heads")
    ]
    for key in keys:
        one, two = series(tmp_path / "single", key), series(tmp_path / "fsdp", key)
        assert sorted(one) == sorted(two) and one, key
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-4), (key, step)
