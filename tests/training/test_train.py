"""End-to-end training on CPU: falling loss, FSDP parity, exact resume, skipped NaN steps."""

import json
import signal
import subprocess
import time

import lightning as L
import pytest
import torch

from olmo_mini.training import TrainingDiverged, train
from olmo_mini.training.checkpoint import COMPLETE
from tests.training.helpers import (
    REPO,
    check,
    compose_config,
    host_syncs,
    metrics,
    run_train,
    series,
    train_command,
)

STABILITY_GROUPS = {"qk", "attn", "act", "grad", "update", "logits"}
METRIC_KEYS = {
    "step",
    "train/loss",
    "train/ce_loss",
    "train/z_loss",
    "train/grad_norm",
    "train/lr",
    "perf/tokens_per_s",
    "perf/mfu",
    "val/loss",
    "train/skipped_steps",
}


def test_default_config_trains_with_falling_loss(tmp_path):
    """olmo2_tiny on the default corpus, with a budget of 16 steps of 8 sequences."""
    config = compose_config(
        "data.global_batch_size=8",
        "trainer.max_steps=16",
        "trainer.val_check_interval=8",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "optim.warmup_steps=4",
        "checkpoint.every_n_steps=8",
        "logger=none",
    )
    result = train(config, tmp_path)
    rows = metrics(tmp_path)
    assert METRIC_KEYS <= set(rows[0])
    loss = series(tmp_path, "train/loss")
    assert sorted(loss) == list(range(1, 17))
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (14, 15, 16)) / 3
    assert last < first - 1.0, loss
    val = series(tmp_path, "val/loss")
    assert sorted(val) == [8, 16] and val[16] < val[8]
    assert result.val_loss == pytest.approx(val[16]) and result.global_step == 16
    assert result.sample and len(result.sample) > len(config.trainer.sample_prompt)
    assert all(0 < v for v in series(tmp_path, "perf/mfu").values())
    assert (tmp_path / "checkpoints" / "step_16" / COMPLETE).is_file()


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_on_one(tmp_path):
    """Same global batch on 1 and 2 processes gives the same losses; the 2-process sharded
    checkpoint resumes on 1 process and continues the same curve."""
    common = [
        "debug=smoke",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "checkpoint.every_n_steps=2",
        "trainer.accelerator=cpu",
        "stability.every_n_steps=2",
    ]
    check(run_train(tmp_path / "single", *common))
    check(run_train(tmp_path / "fsdp", *common, "trainer=fsdp", "trainer.devices=2"))
    single, fsdp = (
        series(tmp_path / "single", "train/loss"),
        series(tmp_path / "fsdp", "train/loss"),
    )
    assert sorted(fsdp) == [1, 2, 3, 4]
    for step in single:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-4), step
    # Stability metrics are reduced over ranks: the same numbers as one process.
    stability = [k for k in metrics(tmp_path / "single")[0] if k.split("/")[0] in STABILITY_GROUPS]
    assert len(stability) > 20
    for key in stability:
        one, two = series(tmp_path / "single", key), series(tmp_path / "fsdp", key)
        assert sorted(one) == sorted(two) == [1, 2, 4], key
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-6), (key, step)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_2"
    assert len(list(checkpoint.glob("*.distcp"))) == 2
    check(
        run_train(
            tmp_path / "resumed",
            *common,
            "trainer=fsdp",
            "trainer.devices=1",
            f"resume={checkpoint}",
        )
    )
    resumed = series(tmp_path / "resumed", "train/loss")
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(fsdp[step], rel=1e-4), step
    assert sorted(series(tmp_path / "resumed", "val/loss")) == [4]


# The schedule spans 1000 steps in every run below, so that stopping early changes nothing.
RESUME = [
    "debug=smoke",
    "trainer.max_steps=1000",
    "trainer.val_check_interval=5",
    "checkpoint.every_n_steps=10",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    check(run_train(run_dir, *RESUME, "trainer.stop_at_step=20"))
    return series(run_dir, "train/loss"), series(run_dir, "val/loss")


def _assert_same_from_11(run_dir, uninterrupted):
    loss, val = uninterrupted
    resumed_loss, resumed_val = series(run_dir, "train/loss"), series(run_dir, "val/loss")
    assert [resumed_loss[s] for s in range(11, 21)] == [loss[s] for s in range(11, 21)]
    assert [resumed_val[s] for s in (15, 20)] == [val[s] for s in (15, 20)]


@pytest.mark.slow
def test_stop_and_resume_is_exact(tmp_path, uninterrupted):
    check(run_train(tmp_path, *RESUME, "trainer.stop_at_step=10"))
    check(run_train(tmp_path, *RESUME, "trainer.stop_at_step=20", "resume=auto"))
    _assert_same_from_11(tmp_path, uninterrupted)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, uninterrupted):
    process = subprocess.Popen(
        train_command(tmp_path, *RESUME),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = tmp_path / "checkpoints" / "step_10" / COMPLETE
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists(), "the run never wrote its step-10 checkpoint"
    assert json.loads(marker.read_text())["step"] == 10
    check(run_train(tmp_path, *RESUME, "trainer.stop_at_step=20", "resume=auto"))
    _assert_same_from_11(tmp_path, uninterrupted)


class PoisonGradients(L.Callback):
    """Makes one gradient NaN at the given optimizer steps (1-based)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.weights: dict[int, torch.Tensor] = {}

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step + 1 in self.steps:
            pl_module.model.lm_head.weight.grad[0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights[trainer.global_step] = pl_module.model.lm_head.weight.detach().clone()
        self.adam_state = trainer.optimizers[0].state[pl_module.model.lm_head.weight]


def _nan_config(*overrides):
    return compose_config(
        "debug=smoke",
        "trainer.val_check_interval=100",
        "checkpoint.every_n_steps=2",
        "checkpoint.save_final=true",
        *overrides,
    )


def test_nan_step_is_skipped_and_training_goes_on(tmp_path):
    poison = PoisonGradients({3})
    train(_nan_config("trainer.max_steps=5"), tmp_path, callbacks=[poison])
    skipped, grad_norm = (
        series(tmp_path, "train/skipped_steps"),
        series(tmp_path, "train/grad_norm"),
    )
    assert [skipped[s] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert grad_norm[3] != grad_norm[3] and all(grad_norm[s] == grad_norm[s] for s in (4, 5))
    assert torch.equal(poison.weights[3], poison.weights[2])  # step 3 changed nothing
    assert not torch.equal(poison.weights[4], poison.weights[3])
    # ... nor AdamW's moments: its step count (bias correction) counts the 4 applied updates.
    assert int(poison.adam_state["step"]) == 4 and poison.adam_state["exp_avg"].isfinite().all()


def test_too_many_nan_steps_stop_the_run_with_checkpoint_intact(tmp_path):
    config = _nan_config("trainer.max_steps=10", "optim.max_consecutive_skips=2")
    with pytest.raises(TrainingDiverged, match="2 optimizer steps in a row"):
        train(config, tmp_path, callbacks=[PoisonGradients({3, 4, 5, 6})])
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_2"]
    assert (tmp_path / "checkpoints" / "step_2" / COMPLETE).is_file()
    assert max(series(tmp_path, "train/loss")) == 4


def test_sequential_runs_in_one_process_get_their_own_wandb_runs(tmp_path):
    """A sequential Hydra sweep trains several runs in one process; each is its own wandb run."""
    for name in ("a", "b"):
        config = compose_config("debug=smoke", "trainer.max_steps=1", "logger=wandb")
        train(config, tmp_path / name)
    for name in ("a", "b"):
        assert len(list((tmp_path / name / "wandb").glob("offline-run-*"))) == 1, name


# What a flush may wait for: the recorder's one transfer of every pending value.
FLUSH_TRANSFER = "Tensor.tolist in recorder.py:flush"


def test_no_host_sync_outside_logging_steps(tmp_path, monkeypatch):
    """Between logging steps a training step never waits for the device: the loss and backward,
    the gradient clipping, the skip decision, the optimizer, the stability measurements and
    QK-Clip stay on the device (no ``.item()``, no data-dependent shape, nothing copied from
    host memory) until the flush, which transfers everything in one ``tolist``."""
    syncs = host_syncs(tmp_path, monkeypatch)
    assert {label: ops for label, ops in syncs.items() if isinstance(label, int)} == {}
    assert syncs == {
        ("flush", 3): [FLUSH_TRANSFER],
        ("flush", 6): [FLUSH_TRANSFER],
        ("flush", "validation"): [FLUSH_TRANSFER],
    }
    assert sorted(series(tmp_path, "train/loss")) == [1, 2, 3, 4, 5, 6]  # every step logged


class AddToStep(L.Callback):
    """Runs ``add(module)`` just before step 1's optimizer step (not a flush step)."""

    def __init__(self, add) -> None:
        self.add = add

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.add(pl_module)


def read_a_value(module) -> None:
    module.model.embed_tokens.weight.sum().item()


def tensor_from_a_number(module) -> None:
    torch.tensor(1.0, device=module.device)


@pytest.mark.parametrize(
    ("add", "found"),
    [
        (read_a_value, "aten._local_scalar_dense.default in test_train.py:read_a_value"),
        (tensor_from_a_number, "aten.lift_fresh.default in test_train.py:tensor_from_a_number"),
    ],
    ids=["item", "tensor"],
)
def test_the_host_sync_check_finds_a_sync_added_to_a_step(tmp_path, monkeypatch, add, found):
    """What ``test_no_host_sync_outside_logging_steps`` would see with one ``.item()`` or one
    ``torch.tensor(x, device=...)`` in a step that does not flush."""
    syncs = host_syncs(tmp_path, monkeypatch, "trainer.max_steps=2", callbacks=[AddToStep(add)])
    assert {label: ops for label, ops in syncs.items() if isinstance(label, int)} == {1: [found]}


def test_spike_scores_see_every_step_when_logging_every_few(tmp_path):
    config = compose_config(
        "debug=smoke",
        "trainer.max_steps=7",
        "trainer.log_every_n_steps=3",
        "trainer.val_check_interval=100",
        "stability.every_n_steps=5",
        "stability.spike_min_history=2",
    )
    train(config, tmp_path)
    assert sorted(series(tmp_path, "stability/spike_score_loss")) == list(range(1, 8))
    assert sorted(series(tmp_path, "attn/layer0/max_logit")) == [1, 5]
    assert sorted(series(tmp_path, "train/grad_norm")) == list(range(1, 8))


def test_each_step_is_one_row_with_every_callbacks_metrics(tmp_path):
    """The monitor's and QK-Clip's metrics of a step land in the same row as the module's, on
    logging and checkpoint steps alike; only a validation adds a row of its own."""
    config = compose_config(
        "debug=smoke",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=3",
        "trainer.val_check_interval=100",
        "stability.every_n_steps=3",
        "optim.qk_clip_tau=100",
        "checkpoint.every_n_steps=2",
    )
    train(config, tmp_path)
    rows = [r for r in metrics(tmp_path) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        step = int(row["step"])
        assert bool(row["attn/layer0/max_logit"]) == (step in (1, 3, 6)), step
        assert bool(row["qk_clip/layer0/max_logit"]) == (step in (3, 6)), step
        assert row["stability/spike_score_loss"], step
    assert [int(r["step"]) for r in metrics(tmp_path) if not r.get("train/loss")] == [6]  # val


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path):
    """``model.compile=true`` compiles the whole model with its chunked loss on one device;
    the losses follow the eager run's."""
    common = [
        "debug=smoke",
        "trainer.max_steps=3",
        "trainer.val_check_interval=100",
        "stability=off",
    ]
    train(compose_config(*common), tmp_path / "eager")
    train(compose_config(*common, "model.compile=true"), tmp_path / "compiled")
    eager, compiled = (
        series(tmp_path / "eager", "train/loss"),
        series(tmp_path / "compiled", "train/loss"),
    )
    assert sorted(compiled) == [1, 2, 3]
    for step in (1, 2, 3):
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4)


class FailAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("injected failure")


def test_an_interrupted_run_still_logs_the_steps_it_completed(tmp_path):
    config = compose_config(
        "debug=smoke",
        "trainer.max_steps=9",
        "trainer.log_every_n_steps=3",
        "stability=off",
        "trainer.val_check_interval=100",
    )
    with pytest.raises(RuntimeError, match="injected failure"):
        train(config, tmp_path, callbacks=[FailAt(5)])
    assert sorted(series(tmp_path, "train/loss")) == [1, 2, 3, 4, 5]
