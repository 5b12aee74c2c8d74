"""Run a stability study plan (studies/<plan>.yaml), resumably, and render its report.

    python tools/study.py --plan A --out /path/to/study-runs/A --report docs/stability-study/A

Every run of the plan trains in this process, one after another, in <out>/<run id>; runs whose
result.json exists are skipped, so the same command continues an interrupted study. Then
<report> gets summary.csv (one row per run), <plan>.md and the figures. --render-only redraws
the report from the completed runs without training.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from olmo_mini.analysis.study import (
    StudyError,
    completed_rows,
    load_plan,
    pooled_std,
    read_rows,
    render,
    run_plan,
)
from olmo_mini.startup import quiet_third_party


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="a name in studies/ or a .yaml path")
    parser.add_argument("--out", type=Path, required=True, help="folder of the plan's run dirs")
    parser.add_argument("--report", type=Path, help="report folder (default: <out>/report)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads per run (1 wastes least CPU on a busy machine)",
    )
    parser.add_argument("--render-only", action="store_true", help="report completed runs only")
    parser.add_argument(
        "--seed-spread",
        type=Path,
        metavar="CSV",
        help="a seeds plan's summary.csv: add each arm's sensitivity std under that noise",
    )
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logging.getLogger("olmo_mini").addHandler(handler)
    logging.getLogger("olmo_mini").setLevel(logging.INFO)
    quiet_third_party()  # as train.py: no GPU/TPU, litlogger or AMP lines per run
    try:
        plan = load_plan(args.plan)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        if args.render_only:
            rows, ran = completed_rows(plan, args.out), 0
        else:
            rows, ran = run_plan(plan, args.out)
        sigma = None
        if args.seed_spread is not None:
            sigma = pooled_std(read_rows(args.seed_spread))
            if not math.isfinite(sigma):
                raise StudyError(f"{args.seed_spread}: no grid point was run with several seeds")
        written = render(plan, rows, args.report or args.out / "report", args.out, sigma)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"plan {plan.name}: {len(rows)} of {len(plan.runs())} runs complete, {ran} trained now")
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
