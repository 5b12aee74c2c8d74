"""Optimizer and schedule settings changed at resume take effect from the resumed step, are
logged one line each and recorded in the run's history (issue 25, item 2)."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest

from olmo_mini.run_dir import HISTORY_FILE
from olmo_mini.training import train
from olmo_mini.training.optim import lr_lambda
from tests.training.helpers import CHECKPOINTS, compose_config, series

# The schedule spans 10 steps with 2 of warmup; a checkpoint at step 4.
BASE = [
    "debug=smoke",
    *CHECKPOINTS,
    "trainer.val_check_interval=100",
    "stability=off",
    "checkpoint.every_n_steps=4",
]


class OptimizerAtEnd(L.Callback):
    """The optimizer's param groups (without the params) when training ends."""

    groups: list[dict] = []

    def on_train_end(self, trainer, pl_module):
        self.groups = [
            {k: v for k, v in g.items() if k != "params"}
            for g in trainer.optimizers[0].param_groups
        ]


def test_settings_changed_at_resume_take_effect_are_logged_and_recorded(tmp_path, caplog):
    train(compose_config(*BASE, "trainer.stop_at_step=4"), tmp_path)
    changed = [
        "optim.lr=1e-3",  # the default is 3e-3
        "optim.min_lr_ratio=0.5",
        "optim.beta2=0.99",
        "optim.eps=1e-6",
        "optim.weight_decay=0.05",
    ]
    seen = OptimizerAtEnd()
    with caplog.at_level(logging.INFO):
        train(
            compose_config(*BASE, *changed, "resume=auto", "trainer.stop_at_step=6"),
            tmp_path,
            callbacks=[seen],
        )
    lr = series(tmp_path, "train/lr")
    before, after = lr_lambda(2, 10, 0.1), lr_lambda(2, 10, 0.5)
    # Step n (1-based) trains at the multiplier of 0-based step n - 1.
    assert lr[4] == pytest.approx(3e-3 * before(3), rel=1e-12)
    assert lr[5] == pytest.approx(1e-3 * after(4), rel=1e-12)
    assert lr[6] == pytest.approx(1e-3 * after(5), rel=1e-12)
    decayed, embedding = seen.groups
    assert decayed["betas"] == (0.9, 0.99) and embedding["betas"] == (0.9, 0.99)
    assert decayed["eps"] == embedding["eps"] == 1e-6
    assert (decayed["weight_decay"], embedding["weight_decay"]) == (0.05, 0.0)
    for line in [
        "optim.lr 0.003 → 0.001 from step 5",
        "optim.min_lr_ratio 0.1 → 0.5 from step 5",
        "optim.beta2 0.95 → 0.99 from step 5",
        "optim.eps 1e-08 → 1e-06 from step 5",
        "optim.weight_decay 0.1 → 0.05 from step 5",
    ]:
        assert line in caplog.messages
    # The next resume, from step_6 (saved with the new settings), changes nothing but the length.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(compose_config(*BASE, *changed, "resume=auto", "trainer.max_steps=12"), tmp_path)
    assert [m for m in caplog.messages if "→" in m] == ["trainer.max_steps 10 → 12 from step 7"]
    assert series(tmp_path, "train/lr")[7] == pytest.approx(1e-3 * lr_lambda(2, 12, 0.5)(6))
    history = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert [(h["resumed_from"], h["from_step"]) for h in history] == [
        (str(tmp_path / "checkpoints" / "step_4"), 5),
        (str(tmp_path / "checkpoints" / "step_6"), 7),
    ]
    assert history[0]["changed"] == {
        "optim.lr": [0.003, 0.001],
        "optim.beta2": [0.95, 0.99],
        "optim.eps": [1e-08, 1e-06],
        "optim.weight_decay": [0.1, 0.05],
        "optim.min_lr_ratio": [0.1, 0.5],
    }
    assert history[1]["changed"] == {"trainer.max_steps": [10, 12]}
