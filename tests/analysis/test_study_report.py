"""docs/stability-study.md against its committed CSVs: the arm tables and the headline
numbers of the text, recomputed from ``docs/stability-study/<plan>/summary.csv``."""

from __future__ import annotations

import re
import statistics

import pytest

from olmo_mini.analysis.sensitivity import lr_sensitivity
from olmo_mini.analysis.study import arm_results, pooled_std, read_rows, size_points
from olmo_mini.analysis.sweep import MIN_GRID_POINTS
from tests.training.helpers import REPO

DOCS = REPO / "docs"
REPORT = (DOCS / "stability-study.md").read_text()
README = (REPO / "README.md").read_text()


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


# --- plans D and D_warmup20: the blow-up ----------------------------------------------------


def _sci(value: float) -> str:
    return f"{value:.0f}" if value < 1000 else f"{value:.1e}".replace("e+0", "e").replace("e+", "e")


def _span(values: list[float], fmt) -> str:
    low, high = fmt(min(values)), fmt(max(values))
    return low if low == high else f"{low}–{high}"


def blow_up_table(plan: str) -> list[str]:
    """The report's plan D table rows of ``plan``, recomputed: ranges over the seeds."""
    groups: dict[tuple[float, str], list[dict]] = {}
    for r in rows(plan):
        groups.setdefault((r["lr"], r["arm"]), []).append(r)
    lines = []
    for (lr, arm), runs in sorted(groups.items(), key=lambda item: item[0][0]):
        cells = [
            _span([r[key] for r in runs], fmt)
            for key, fmt in (
                ("final_loss", lambda v: f"{v:.2f}"),
                ("share_above_init", lambda v: f"{100 * v:.0f}"),
                ("max_train_loss", lambda v: f"{v:.0f}"),
                ("peak_attn_logit", _sci),
                ("peak_abs_logsumexp", lambda v: f"{v:.0f}"),
            )
        ]
        diverged = f"{sum(r['diverged'] for r in runs)} of {len(runs)}"
        lines.append(
            f"| {plan} | {arm} | {lr:.1f} | {cells[0]} | {cells[1]}% | {cells[2]} | {cells[3]} | "
            f"{cells[4]} | {diverged} |"
        )
    return lines


@pytest.mark.parametrize("plan", ["D", "D_warmup20", "D_block"])
def test_blow_up_table_equals_the_csv(plan: str) -> None:
    table = blow_up_table(plan)
    assert len(table) == {"D": 6, "D_warmup20": 8, "D_block": 2}[plan]
    for line in table:
        assert line in REPORT, line


def test_blow_up_headline_numbers() -> None:
    both = rows("D") + rows("D_warmup20") + rows("D_block")
    assert len(both) == 48 and not any(r["diverged_by_final"] for r in both)
    assert "the final-loss rule of the\nfirst two editions calls all 48 runs healthy" in REPORT
    spiky = [r for r in both if r["spike_score_loss"] > 0]
    assert len(spiky) == 1 and "is 0 in 47 of\nthem (0.34% in the 48th)" in REPORT
    assert f"{spiky[0]['spike_score_loss']:.2f}" == "0.34"

    def mean_final(arm: str) -> float:
        values = [r["final_loss"] for r in rows("D_warmup20") if r["arm"] == arm and r["lr"] == 0.3]
        assert len(values) == 3
        return statistics.mean(values)

    none, layer_norm = mean_final("wortsman, qk_norm=none"), mean_final("wortsman, qk-LayerNorm")
    assert (f"{none:.2f}", f"{layer_norm:.2f}", f"{none - layer_norm:.2f}") == (
        "5.88",
        "4.94",
        "0.94",
    )
    assert "costs **0.94 nats** of final loss (5.88 mean without" in REPORT
    olmo = (mean_final("OLMo 2, qk_norm=none"), mean_final("OLMo 2"))
    assert tuple(f"{v:.2f}" for v in olmo) == ("4.53", "4.52")
    for plan, cpu in (("D", "22.4"), ("D_warmup20", "30.3"), ("D_block", "11.8")):
        assert f"{sum(r['cpu_s'] for r in rows(plan)) / 60:.1f}" == cpu
    assert "plan D 22.4 CPU-minutes (18 runs), D_warmup20 30.3 (24 runs), D_block 11.8 (6" in REPORT
    pre = rows("D_block")
    shares = [r["share_above_init"] for r in pre]
    assert (f"{100 * min(shares):.0f}", f"{100 * max(shares):.0f}") == ("78", "82")
    log_z = [r["peak_abs_logsumexp"] for r in pre]
    assert (f"{min(log_z):.0f}", f"{max(log_z):.0f}") == ("194", "364")
    assert "78–82% of its steps above init and log\n  Z up to 194–364" in REPORT


# --- plan S: LR sensitivity against model size ------------------------------------------------


def _sensitivity(runs: list[dict], max_lr: float) -> list[float]:
    """Per seed: LR sensitivity over the LRs up to ``max_lr``."""
    by_seed: dict[int, list[dict]] = {}
    for r in runs:
        if r["lr"] <= max_lr:
            by_seed.setdefault(r["seed"], []).append(r)
    return [
        lr_sensitivity(
            {r["lr"]: r["final_loss"] for r in seed_runs},
            statistics.mean(r["init_loss"] for r in seed_runs),
        )
        for _, seed_runs in sorted(by_seed.items())
    ]


def size_tables() -> list[str]:
    """The report's three plan S tables, recomputed from the CSV, as markdown lines."""
    plan = rows("S")
    sizes = list(dict.fromkeys(r["size"] for r in plan))
    lrs = sorted({r["lr"] for r in plan})
    runs = lambda size, arm: [r for r in plan if r["arm"] == f"{size}, {arm}"]  # noqa: E731
    ms = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"  # noqa: E731
    lines = []
    for size in sizes:
        none, norm = runs(size, "qk_norm=none"), runs(size, "qk-LayerNorm")
        full = [_sensitivity(arm, 1.0) for arm in (none, norm)]
        capped = [_sensitivity(arm, 0.3) for arm in (none, norm)]
        gap = statistics.mean(full[0]) - statistics.mean(full[1])
        lines.append(
            f"| {size} | {none[0]['non_embedding_params']:,} | {ms(full[0])} | {ms(full[1])} | "
            f"{gap:.2f} | {ms(capped[0])} | {ms(capped[1])} |"
        )
        assert f"| {ms(full[0])} | {ms(full[1])} |\n" in README  # the README's table
    lines += ["| size | arm | " + " | ".join(f"{lr:g}" for lr in lrs) + " |"]
    for size in sizes:
        for arm in ("qk_norm=none", "qk-LayerNorm"):
            cells = []
            for lr in lrs:
                at = [r for r in runs(size, arm) if r["lr"] == lr]
                diverged = " ✗" if any(r["diverged"] for r in at) else ""
                cells.append(f"{statistics.mean(r['final_loss'] for r in at):.2f}{diverged}")
            lines.append(f"| {size} | {arm} | " + " | ".join(cells) + " |")
    lines += ["| size | " + " | ".join(f"{lr:g}" for lr in lrs) + " |"]
    for size in sizes:
        cells = [
            _sci(max(r["peak_attn_logit"] for r in runs(size, "qk_norm=none") if r["lr"] == lr))
            for lr in lrs
        ]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return lines


def test_size_tables_equal_the_csv() -> None:
    plan = rows("S")
    assert len(plan) == 112 and len({r["size"] for r in plan}) == 4
    for line in size_tables():
        assert line in REPORT, line
    # The report's own table (tools/study.py) agrees with the test's sensitivity.
    for point in size_points(plan):
        runs = [r for r in plan if r["arm"] == f"{point.size}, {point.arm}"]
        assert list(point.sensitivities.values()) == pytest.approx(_sensitivity(runs, 1.0))


def test_size_headline_numbers() -> None:
    plan = rows("S")
    diverged = {(r["lr"], r["arm"]) for r in plan if r["diverged"]}
    assert {lr for lr, _ in diverged} == {1.0} and len(diverged) == 8
    assert all(r["diverged"] for r in plan if r["lr"] == 1.0)
    shares = [r["share_above_init"] for r in plan if r["lr"] == 1.0]
    assert (f"{100 * min(shares):.0f}", f"{100 * max(shares):.0f}") == ("16", "78")
    assert max(r["share_above_init"] for r in plan if r["lr"] < 1.0) == pytest.approx(
        0.05, abs=0.005
    )
    assert "(above init on 16–78% of its steps)" in REPORT

    def twin_gap(r: dict) -> float:
        twin = next(
            t
            for t in plan
            if t["arm"] == f"{r['size']}, qk-LayerNorm"
            and (t["lr"], t["seed"]) == (r["lr"], r["seed"])
        )
        return r["final_loss"] - twin["final_loss"]

    unnormalized = [r for r in plan if r["arm"].endswith("qk_norm=none") and r["lr"] < 1.0]
    # The lowest LR at which the unnormalized model is > 0.25 nats behind in both seeds.
    onset = {}
    for size in dict.fromkeys(r["size"] for r in plan):
        behind = {
            lr
            for lr in {r["lr"] for r in unnormalized}
            if all(twin_gap(r) > 0.25 for r in unnormalized if (r["size"], r["lr"]) == (size, lr))
        }
        onset[size] = min(behind)
    assert list(onset.values()) == [0.3, 0.1, 0.03, 0.01]
    assert "is 0.3 at d64, 0.1 at d128, 0.03 at\n  d192 and 0.01 at d256" in REPORT
    past = [twin_gap(r) for r in unnormalized if r["peak_attn_logit"] > 1e4]
    assert (f"{min(past):.2f}", f"{max(past):.2f}") == ("0.17", "0.93")
    early = [r for r in unnormalized if r["size"] == "d256 L4" and r["lr"] == 0.01]
    assert [f"{twin_gap(r):.2f}" for r in early] == ["0.26", "0.28"]
    assert max(r["peak_attn_logit"] for r in early) < 1e3
    assert "ended 0.17–0.93 nats behind its qk-LayerNorm twin" in REPORT
    assert f"{sum(r['cpu_s'] for r in plan) / 60:.1f}" == "46.3"
    assert "46.3 CPU-minutes for the 112 runs" in REPORT


# --- plans A-C re-run for their trajectories ----------------------------------------------------


def rejudged_row(plan: str) -> str:
    """The re-judging table's row of ``plan``: the re-run's verdicts by both rules, the runs the
    trajectory rule calls diverged, and how far the re-run's final losses moved."""
    new = read_rows(DOCS / "stability-study" / "rejudged" / plan / "summary.csv")
    old = {(r["arm"], r["lr"], r["seed"]): r["final_loss"] for r in rows(plan)}
    moved = [abs(r["final_loss"] - old[(r["arm"], r["lr"], r["seed"])]) for r in new]
    by_arm: dict[str, list[str]] = {}
    for r in new:
        if r["diverged"]:
            by_arm.setdefault(r["arm"], []).append(f"{r['lr']:g}")
    which = "; ".join(f"{arm} @ {', '.join(lrs)}" for arm, lrs in by_arm.items()) or "none"
    return (
        f"| {plan} | {len(new)} | {sum(r['diverged_by_final'] for r in new)} | "
        f"{sum(r['diverged'] for r in new)} | {which} | "
        f"{statistics.median(moved):.3f} / {max(moved):.3f} |"
    )


@pytest.mark.parametrize("plan", ["A", "B", "C1", "C2", "C3"])
def test_rejudged_table_equals_the_csvs(plan: str) -> None:
    assert rejudged_row(plan) in REPORT


def test_rejudged_plan_a_numbers() -> None:
    rerun = read_rows(DOCS / "stability-study" / "rejudged" / "A" / "summary.csv")
    top = [r for r in rerun if r["lr"] == 1.0]
    shares = sorted(r["share_above_init"] for r in top if r["diverged"])
    assert len(shares) == 9
    assert (f"{100 * shares[0]:.1f}", f"{100 * shares[-1]:.0f}") == ("10.5", "36")
    held = {r["arm"]: r["share_above_init"] for r in top if not r["diverged"]}
    assert sorted(held) == ["none + QK-Clip 100", "qk_norm=l2"]
    assert {f"{100 * v:.1f}" for v in held.values()} == {"9.5"}
    assert max(r["share_above_init"] for r in rerun if r["lr"] < 1.0) < 0.075
    assert "(10.5–36%, peaks of 24–79 nats by step 35)" in REPORT
    moved = {a.arm: a.sensitivity for a in arm_results(rerun)}
    before = {a.arm: a.sensitivity for a in arm_results(rows("A"))}
    assert f"{max(abs(moved[k] - before[k]) for k in moved):.2f}" == "0.12"
