"""What reads finished runs or drives training, above ``training``: run readers, comparisons,
LR sensitivity and the study runner."""

from typing import TYPE_CHECKING

from olmo_mini._lazy import lazy_exports

if TYPE_CHECKING:
    from olmo_mini.analysis.compare import compare_runs
    from olmo_mini.analysis.runs import Run, find_runs, load_run
    from olmo_mini.analysis.sensitivity import lr_sensitivity, score_arms
    from olmo_mini.analysis.study import load_plan, render, run_plan
    from olmo_mini.analysis.sweep import write_report

__all__ = [
    "Run",
    "compare_runs",
    "find_runs",
    "load_plan",
    "load_run",
    "lr_sensitivity",
    "render",
    "run_plan",
    "score_arms",
    "write_report",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "compare_runs": ".compare",
        "Run": ".runs",
        "find_runs": ".runs",
        "load_run": ".runs",
        "lr_sensitivity": ".sensitivity",
        "score_arms": ".sensitivity",
        "load_plan": ".study",
        "render": ".study",
        "run_plan": ".study",
        "write_report": ".sweep",
    },
)
