"""docs/stability-study.md against its committed CSVs: the arm tables and the headline
numbers of the text, recomputed from ``docs/stability-study/<plan>/summary.csv``."""

from __future__ import annotations

import re
import statistics

import pytest

from olmo_mini.analysis.study import arm_results, pooled_std, read_rows
from olmo_mini.analysis.sweep import MIN_GRID_POINTS
from tests.training.helpers import REPO

DOCS = REPO / "docs"
REPORT = (DOCS / "stability-study.md").read_text()


def rows(plan: str) -> list[dict]:
    return read_rows(DOCS / "stability-study" / plan / "summary.csv")


def finals(plan: str) -> dict[tuple[str, float], float]:
    return {(r["arm"], r["lr"]): r["final_loss"] for r in rows(plan)}


@pytest.mark.parametrize("plan", ["A", "B"])
def test_arm_tables_equal_the_csv(plan: str) -> None:
    """Each arm's row of the report's table: LRs, loss at init, best LR and loss, sensitivity."""
    for arm in arm_results(rows(plan)):
        cells = (
            f"| {arm.arm} | {len(arm.finals)} | {arm.init_loss:.3f} | {arm.best_lr:.4g} | "
            f"{arm.best_loss:.4g} | **{arm.sensitivity:.3f}**"
        )
        assert cells in REPORT, cells


def test_plan_a_low_lr_gap_and_pre_norm_degradation() -> None:
    loss = finals("A")
    none = loss[("qk_norm=none", 1e-3)]
    assert f"{none:.2f}" == "5.86"
    normalized = [
        loss[(arm, 1e-3)] for arm in ("qk_norm=full (OLMo 2)", "qk_norm=head", "qk_norm=qkv")
    ]
    gaps = sorted(none - v for v in normalized)
    assert (f"{gaps[0]:.2f}", f"{gaps[-1]:.2f}") == ("0.59", "0.60")
    assert f"{none - loss[('qk_norm=l2', 1e-3)]:.2f}" == "0.38"
    assert "0.59–0.60\n  nats above `full`, `head` and `qkv`" in REPORT
    assert "(5.26–5.27) and 0.38 above `l2` (5.48)" in REPORT
    lrs = sorted({lr for _, lr in loss})
    drops = []
    for arm in ("block=pre, full", "block=pre, none"):
        best = min(loss[(arm, lr)] for lr in lrs)
        assert best == loss[(arm, 3e-3)]
        drops += [loss[(arm, lr)] - best for lr in lrs if lr >= 0.03]
    assert (f"{min(drops):.2f}", f"{max(drops):.2f}") == ("0.92", "1.52")
    assert "end 0.92–1.52 nats above that best at LR ≥ 0.03" in REPORT


def test_plan_b_grid_is_flagged_as_too_small() -> None:
    assert len({r["lr"] for r in rows("B")}) == 3 < MIN_GRID_POINTS
    assert 'the "LR sensitivity" column of this table is over 3 LRs only' in REPORT


def test_seed_noise_numbers() -> None:
    assert f"{pooled_std(rows('seeds')):.3f}" == "0.099"
    assert "pooled std **0.099 nats**" in REPORT
    by_seed = {a.label: a.sensitivity for a in arm_results(rows("A") + rows("seeds_grid"))}
    for arm, text in (("qk_norm=full (OLMo 2)", "0.30 ± 0.07"), ("qk_norm=none", "0.55 ± 0.05")):
        values = [
            v
            for label, v in by_seed.items()
            if re.fullmatch(rf"{re.escape(arm)} \(seed \d\)", label)
        ]
        assert len(values) == 3
        assert f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" == text
        assert text in REPORT
